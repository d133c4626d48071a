"""Turning a batch of logits into next tokens (and their log-probabilities).

Order of operations per row, as OpenAI and vLLM define them: logit_bias; repetition_penalty (over prompt
and output tokens); frequency and presence penalties (over output tokens); then greedy argmax at
temperature 0, or temperature, top_k, top_p, min_p and a draw. Log-probabilities are those of the model's
raw distribution (log-softmax of the unmodified logits).

Randomness comes from (request seed, output position) alone: each row's draw uses one uniform derived
from both, so a request's tokens do not depend on what else shares the batch, or on whether it was
preempted and resumed. Every step is vectorised over the batch with per-row parameter tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from phi4.model import cpu_kernels
from phi4.sampling_params import SamplingParams
from phi4.structured.constraint import BatchMasks

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): decorrelated generator seeds for neighbouring positions."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    seed: int
    token_ids: Sequence[int]  # the request's prompt and output so far (not copied: read only for penalties)
    num_prompt_tokens: int

    @property
    def position(self) -> int:
        """Index of the token being sampled among the request's outputs."""
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the `logprobs` most likely tokens, most likely first
    rank: int = 1  # 1 + how many tokens were more likely


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs
    errors: list[str | None]  # why a row could not be sampled: that request ends with it, the others go on
    # per request that asked: the prompt log-probabilities this step's prefill chunk reached, in order
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)


def sample_isolated(logits: torch.Tensor, rows: list[SamplingRow], masks: BatchMasks | None = None) -> SampleResult:
    """`sample` for the batch; if that raises, each row alone (a row's draw never depends on the others,
    so the survivors get the same tokens), and a row that fails alone, or whose grammar failed, gets its
    error instead of a token."""
    allowed = masks.allowed if masks is not None else None
    try:
        token_ids, logprobs = sample(logits, rows, allowed)
        errors: list[str | None] = [None] * len(rows)
    except Exception:  # noqa: BLE001 - find the culprits; the batch goes on without them
        token_ids, logprobs, errors = [], [], []
        for i, row in enumerate(rows):
            try:
                (token,), (logprob,) = sample(logits[i : i + 1], [row], None if allowed is None else allowed[i : i + 1])
                error = None
            except Exception as exc:  # noqa: BLE001
                token, logprob, error = 0, None, f"sampling failed: {exc!r}"
            token_ids.append(token)
            logprobs.append(logprob)
            errors.append(error)
    if masks is not None:
        for row, message in masks.failed.items():
            errors[row] = message
    return SampleResult(token_ids, logprobs, errors)


def sample(logits: torch.Tensor, rows: list[SamplingRow],
           allowed: torch.Tensor | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token per row of `logits` [B, V] (float32), and its log-probabilities where asked. Temperature 0
    (or below MIN_TEMPERATURE) is argmax, ties to the lowest id. `allowed` [B, V] (grammar masks) bans every
    token it marks False."""
    raw = logits
    logits = _apply_penalties(logits, rows)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    greedy = _argmax(logits)
    if all(row.params.greedy for row in rows):
        chosen = greedy
    else:
        chosen = _draw(logits, greedy, rows)
    token_ids = chosen.tolist()
    return token_ids, _logprobs(raw, token_ids, rows)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.is_cuda:
        return logits.argmax(dim=-1)
    return cpu_kernels.argmax(logits.contiguous())


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = logits.device
    vocab_size = logits.shape[-1]
    if any(row.params.logit_bias for row in rows):
        logits = logits.clone()
        index = [(i, token) for i, row in enumerate(rows) for token in row.params.logit_bias]
        bias = [row.params.logit_bias[token] for row in rows for token in row.params.logit_bias]
        rows_t, tokens_t = torch.tensor(index, device=device).unbind(1)
        logits.index_put_((rows_t, tokens_t), torch.tensor(bias, device=device, dtype=logits.dtype), accumulate=True)
    if any(row.params.repetition_penalty != 1.0 for row in rows):
        seen = _token_counts(rows, vocab_size, device, include_prompt=True) > 0
        penalty = torch.tensor([row.params.repetition_penalty for row in rows], device=device)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if any(row.params.frequency_penalty or row.params.presence_penalty for row in rows):
        counts = _token_counts(rows, vocab_size, device, include_prompt=False)
        frequency = torch.tensor([row.params.frequency_penalty for row in rows], device=device)[:, None]
        presence = torch.tensor([row.params.presence_penalty for row in rows], device=device)[:, None]
        logits = logits - counts * frequency - (counts > 0).to(logits.dtype) * presence
    return logits


def _token_counts(rows: list[SamplingRow], vocab_size: int, device: torch.device, include_prompt: bool) -> torch.Tensor:
    """[B, vocab] how often each token occurs in each row's output (and prompt): one scatter-add."""
    per_row = [torch.tensor(row.token_ids[0 if include_prompt else row.num_prompt_tokens :], dtype=torch.long)
               for row in rows]
    lengths = torch.tensor([len(t) for t in per_row])
    row_index = torch.repeat_interleave(torch.arange(len(rows)), lengths).to(device)
    counts = torch.zeros(len(rows), vocab_size, device=device)
    counts.index_put_((row_index, torch.cat(per_row).to(device)), torch.ones(len(row_index), device=device),
                      accumulate=True)
    return counts


def _draw(logits: torch.Tensor, greedy: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([1.0 if row.params.greedy else row.params.temperature for row in rows], device=device)
    scaled = logits / temperature[:, None]
    if any(row.params.top_k or row.params.top_p < 1.0 for row in rows):
        scaled = _top_k_top_p(scaled, rows)
    probs = torch.softmax(scaled, dim=-1)
    if any(row.params.min_p > 0.0 for row in rows):
        min_p = torch.tensor([row.params.min_p for row in rows], device=device)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    # Inverse-CDF sampling with one uniform per row, drawn from (seed, position): the row's cumulative sum
    # is a sequential scan of its own probabilities, so nothing else in the batch can change the draw.
    uniform = torch.tensor([_uniform(row.seed, row.position) for row in rows],
                           dtype=torch.float64, device=device)
    cdf = probs.double().cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    is_greedy = torch.tensor([row.params.greedy for row in rows], device=device)
    return torch.where(is_greedy, greedy, sampled)


def _uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) with 53 random bits, a pure function of (seed, position)."""
    return (mix_seed(seed, position) >> 11) * 2.0**-53


TOP_CANDIDATES = 1024


def _top_k_top_p(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask all but each row's top_k tokens, then all but the smallest prefix whose probability reaches
    top_p (renormalised over the top_k set; the first token always stays).

    On CPU, sorting 100k logits per row dominates a step, so the cut is looked for among the best
    TOP_CANDIDATES first; a row whose candidates hold less than top_p of the mass is cut again after a full
    sort. Which way a row goes depends on that row alone, never on the batch. On a GPU every row is fully
    sorted: that is cheap there and needs no host synchronisation.
    """
    vocab_size = scaled.shape[-1]
    top_k = torch.tensor([min(row.params.top_k or vocab_size, vocab_size) for row in rows], device=scaled.device)
    top_p = torch.tensor([row.params.top_p for row in rows], device=scaled.device)
    if scaled.is_cuda:
        return _cut_sorted(scaled, top_k, top_p)
    candidates = min(vocab_size, max(TOP_CANDIDATES, *(row.params.top_k for row in rows)))
    values, order = scaled.topk(candidates, dim=-1)
    ranks = torch.arange(candidates, device=scaled.device)[None, :]
    values = values.masked_fill(ranks >= top_k[:, None], float("-inf"))
    # Normalise over the top_k set where there is one (it lies among the candidates), else the whole row.
    normaliser = torch.where(top_k < vocab_size, torch.logsumexp(values, dim=-1), torch.logsumexp(scaled, dim=-1))
    probs = torch.exp(values - normaliser[:, None])
    mass_before = probs.cumsum(dim=-1) - probs
    values = values.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    result = torch.full_like(scaled, float("-inf")).scatter(-1, order, values)
    short = ((probs.sum(dim=-1) < top_p) & (top_p < 1.0)).nonzero().squeeze(1)
    if short.numel():
        result[short] = _cut_sorted(scaled[short], top_k[short], top_p[short])
    return result


def _cut_sorted(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_k and top_p over a full sort of each row."""
    values, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    values = values.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    values = values.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, values)


def _logprobs(raw: torch.Tensor, token_ids: list[int], rows: list[SamplingRow]) -> list[TokenLogprob | None]:
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    results: list[TokenLogprob | None] = [None] * len(rows)
    if wanted:
        index = torch.tensor(wanted, device=raw.device)
        computed = token_logprobs(raw[index], [token_ids[i] for i in wanted],
                                  [rows[i].params.logprobs or 0 for i in wanted])
        for i, entry in zip(wanted, computed):
            results[i] = entry
    return results


def token_logprobs(logits: torch.Tensor, token_ids: list[int], tops: list[int]) -> list[TokenLogprob]:
    """For each row of raw `logits`: the log-probability of its token and its `tops[row]` most likely. Prompt
    log-probabilities come through here too, so that they equal a generated token's bit for bit."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor([[t] for t in token_ids], device=logits.device))
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    most = max(tops, default=0)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    top_values_l, top_ids_l, chosen_l = top_values.tolist(), top_ids.tolist(), chosen[:, 0].tolist()
    return [TokenLogprob(token, chosen_l[j], list(zip(top_ids_l[j][:count], top_values_l[j][:count])), ranks[j])
            for j, (token, count) in enumerate(zip(token_ids, tops))]
