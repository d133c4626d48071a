"""The sampler against direct computations on the logits."""

from __future__ import annotations

from collections import Counter

import torch

from phi4 import SamplingParams
from phi4.engine.sampling import SamplingRow
from phi4.engine.sampling import sample_isolated as sample

PROBS = [0.5, 0.3, 0.15, 0.05]


def row(seed: int = 0, prompt: tuple[int, ...] = (), output: tuple[int, ...] = (), **params: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, [*prompt, *output], len(prompt))  # type: ignore[arg-type]


def draw_counts(logits: torch.Tensor, n: int, **params: object) -> Counter:
    return Counter(sample(logits, [row(seed, **params)]).token_ids[0] for seed in range(n))


def test_draws_follow_the_softmax() -> None:
    counts = draw_counts(torch.log(torch.tensor([PROBS])), 4000, temperature=1.0)
    for token, p in enumerate(PROBS):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.log(torch.tensor([PROBS]))
    cold = draw_counts(logits, 2000, temperature=0.5)
    expected_cold = torch.softmax(logits / 0.5, dim=-1)[0]
    assert abs(cold[0] / 2000 - expected_cold[0].item()) < 0.03


def test_top_k_top_p_and_min_p_cut_the_tail() -> None:
    logits = torch.log(torch.tensor([PROBS]))
    assert set(draw_counts(logits, 400, top_k=2)) == {0, 1}
    assert set(draw_counts(logits, 400, top_p=0.75)) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(draw_counts(logits, 400, top_p=0.81)) == {0, 1, 2}
    assert set(draw_counts(logits, 400, min_p=0.35)) == {0, 1}  # 0.15 < 0.35 * 0.5


def test_greedy_ties_go_to_the_lowest_id() -> None:
    assert sample(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), [row(temperature=0.0)]).token_ids == [1]


def test_frequency_and_presence_penalties_follow_openais_formula() -> None:
    logits = torch.tensor([[2.0, 1.9, 1.8, 0.0]])
    output = (0, 0, 1)
    # logit[j] -= count_j * frequency + (count_j > 0) * presence: [2 - 2*0.5 - 0.1, 1.9 - 0.5 - 0.1, 1.8, 0]
    greedy = sample(logits, [row(output=output, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.1)])
    assert greedy.token_ids == [2]
    adjusted = logits - torch.tensor([[2 * 0.5 + 0.1, 0.5 + 0.1, 0.0, 0.0]])
    counts = draw_counts_with_output(logits, output, frequency_penalty=0.5, presence_penalty=0.1)
    expected = torch.softmax(adjusted, dim=-1)[0]
    for token in range(4):
        assert abs(counts[token] / 3000 - expected[token].item()) < 0.03
    # Prompt tokens do not count for these penalties.
    assert sample(logits, [row(prompt=(0, 0, 0), temperature=0.0, frequency_penalty=2.0)]).token_ids == [0]


def draw_counts_with_output(logits: torch.Tensor, output: tuple[int, ...], **params: object) -> Counter:
    return Counter(sample(logits, [row(seed, output=output, **params)]).token_ids[0] for seed in range(3000))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2]])
    # token 0 seen in the prompt: 2.0 / 2 = 1.0 < 1.5, so token 1 wins.
    assert sample(logits, [row(prompt=(0,), temperature=0.0, repetition_penalty=2.0)]).token_ids == [1]
    # Negative logits get more negative: -1.0 * 1.5 = -1.5 < -1.2.
    banned_top = torch.tensor([[-5.0, -5.0, -1.0, -1.2]])
    assert sample(banned_top, [row(output=(2,), temperature=0.0, repetition_penalty=1.5)]).token_ids == [3]


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = torch.randn(1, 1000) * 3
    top = int(logits.argmax())
    assert top not in draw_counts(logits, 300, temperature=1.0, logit_bias={top: -100})
    assert set(draw_counts(logits, 300, temperature=1.0, logit_bias={7: 100})) == {7}
    assert sample(logits, [row(temperature=0.0, logit_bias={top: -100})]).token_ids != [top]


def test_logprobs_come_from_the_raw_distribution() -> None:
    logits = torch.log(torch.tensor([PROBS]))
    result = sample(logits, [row(temperature=0.0, logprobs=3, logit_bias={3: 100})])
    entry = result.logprobs[0]
    assert result.token_ids == [3] and entry is not None
    assert abs(entry.logprob - torch.log(torch.tensor(0.05)).item()) < 1e-5  # unbiased probability
    assert [t for t, _ in entry.top] == [0, 1, 2]
    assert sample(logits, [row(temperature=0.0)]).logprobs == [None]


def test_each_row_is_independent_of_its_neighbours() -> None:
    logits = torch.zeros(3, 1000)
    rows = [row(1), row(2), row(1, output=(5, 6))]
    together = sample(logits, rows).token_ids
    assert together == [sample(logits[:1], [r]).token_ids[0] for r in rows]
    assert len(set(together)) == 3


def test_top_p_over_a_flat_distribution_falls_back_to_a_full_sort() -> None:
    # 4,000 equally likely tokens: the best 1,024 candidates hold only about a quarter of the mass.
    logits = torch.zeros(1, 4000)
    drawn = {sample(logits, [row(seed, top_p=0.5)]).token_ids[0] for seed in range(300)}
    assert max(drawn) >= 1024 and len(drawn) > 200
    peaked = torch.log(torch.tensor([PROBS + [1e-9] * 3000]))
    assert set(draw_counts(peaked, 300, top_p=0.75)) == {0, 1}
    assert set(draw_counts(peaked, 300, top_k=3, top_p=0.9)) == {0, 1, 2}  # renormalised over the top 3


def test_a_rows_top_p_cut_does_not_depend_on_a_neighbour_that_needs_a_full_sort() -> None:
    """The candidate shortcut or the full sort is chosen per row: a flat neighbour changes nothing."""
    torch.manual_seed(0)
    peaked = torch.randn(1, 4000) * 4  # its best 1,024 tokens hold nearly all the mass
    flat = torch.zeros(1, 4000)
    for seed in range(40):
        alone = sample(peaked, [row(seed, top_p=0.95, logprobs=0)])
        beside = sample(torch.cat((flat, peaked)), [row(seed + 1, top_p=0.95), row(seed, top_p=0.95, logprobs=0)])
        assert beside.token_ids[1] == alone.token_ids[0]
        assert beside.logprobs[1] == alone.logprobs[0]


def test_a_tiny_positive_temperature_is_greedy() -> None:
    logits = torch.tensor([[0.5, 2.0, 1.0, 0.0]])
    assert all(sample(logits, [row(seed, temperature=1e-300)]).token_ids == [1] for seed in range(20))


def test_a_row_that_cannot_be_sampled_fails_alone() -> None:
    logits = torch.tensor([[0.5, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    broken = row(0, temperature=1.0, logit_bias={10**6: 1.0})  # a token id the engine would have refused
    result = sample(logits, [broken, row(1, temperature=0.0)])
    assert result.errors[0] is not None and result.errors[1] is None and result.token_ids[1] == 0
