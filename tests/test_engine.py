"""Engine behaviour a user of `LLM` notices: stopping, errors, seeds, streaming, aborts, memory."""

from __future__ import annotations

import pytest
from phi4 import LLM, ContextLengthExceededError, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(demo_dir) -> LLM:  # type: ignore[no-untyped-def]
    return LLM("demo", max_model_len=512)


def test_prompt_longer_than_the_context_is_a_typed_error_naming_both_lengths(llm: LLM) -> None:
    with pytest.raises(ContextLengthExceededError) as info:
        llm.generate([[42] * 600], GREEDY)
    assert info.value.num_tokens == 600 and info.value.max_model_len == 512
    assert "600" in str(info.value) and "512" in str(info.value)
    assert not llm.engine.has_unfinished_requests()


def test_generation_stops_at_the_end_of_the_context(llm: LLM) -> None:
    result = llm.generate([[42] * 500], SamplingParams(temperature=0.0, ignore_eos=True))[0]
    assert len(result.token_ids) == 12 and result.finish_reason == "length"


def test_max_tokens_caps_the_output(llm: LLM) -> None:
    result = llm.generate("Count to ten:", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


def test_stop_token_ends_the_request_and_is_not_shown(llm: LLM) -> None:
    free_run = llm.generate("Once upon a time", GREEDY)[0]
    stop_token = free_run.token_ids[4]
    first = free_run.token_ids.index(stop_token)
    stopped = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                              stop_token_ids=(stop_token,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run.token_ids[: first + 1]
    assert stopped.text == llm.tokenizer.decode(free_run.token_ids[:first], skip_special_tokens=True)


def test_eos_stops_unless_ignored(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    free_run = llm.generate("The end", GREEDY)[0]
    eos = free_run.token_ids[3]
    monkeypatch.setattr(llm.engine.outputs, "eos_token_ids", frozenset({eos}))
    stopped = llm.generate("The end", SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == eos
    assert len(stopped.token_ids) == free_run.token_ids.index(eos) + 1
    assert llm.generate("The end", GREEDY)[0].token_ids == free_run.token_ids


def test_same_seed_same_output_different_seed_different_output(llm: LLM) -> None:
    def run(seed: int, prompt: str = "Tell me a story") -> list[int]:
        params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=seed, ignore_eos=True)
        return llm.generate(prompt, params)[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)
    # A seeded request is unaffected by other requests sharing its steps.
    alone = run(11)
    crowd = llm.generate(
        ["Tell me a story", "Another request", "And a third one, longer than the others by far"],
        [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=11, ignore_eos=True),
         SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
         SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)],
    )
    assert crowd[0].token_ids == alone


def test_streamed_text_and_tokens_equal_the_final_result(llm: LLM) -> None:
    prompts = ["Streaming one", "Streaming two, a longer prompt than the first"]
    expected = llm.generate(prompts, GREEDY)
    tokens: dict[str, list[int]] = {}
    text: dict[str, str] = {}
    finished = []
    for output in llm.stream(prompts, GREEDY):
        tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        text[output.request_id] = text.get(output.request_id, "") + output.new_text
        if output.finished:
            finished.append(output.request_id)
    assert len(finished) == 2
    in_prompt_order = sorted(tokens, key=lambda rid: int(rid.removeprefix("req-")))  # ids count up
    assert [tokens[r] for r in in_prompt_order] == [e.token_ids for e in expected]
    assert [text[r] for r in in_prompt_order] == [e.text for e in expected]


def test_leaving_a_stream_early_frees_its_blocks(llm: LLM) -> None:
    manager = llm.engine.block_manager
    free_before = manager.num_free_blocks
    for output in llm.stream(["abandoned " * 40], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)):
        if output.num_output_tokens == 3:
            break
    assert not llm.engine.has_unfinished_requests()
    assert manager.num_free_blocks == free_before


def test_abort_frees_a_request_and_reports_it(llm: LLM) -> None:
    engine = llm.engine
    free_before = engine.block_manager.num_free_blocks
    rid = engine.add_request("to be aborted " * 10, GREEDY)
    engine.step()
    output = engine.abort_request(rid)
    assert output is not None and output.finished and output.finish_reason == "abort"
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == free_before
    assert engine.abort_request(rid) is None


def test_nothing_is_dropped_when_the_cache_is_oversubscribed(demo_dir) -> None:  # type: ignore[no-untyped-def]
    small = LLM("demo", num_kv_blocks=8, max_model_len=128)
    prompts = [[100 + i] * (10 + 7 * i) for i in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=20 + i, ignore_eos=True) for i in range(12)]
    results = small.generate(prompts, params)
    assert [len(r.token_ids) for r in results] == [20 + i for i in range(12)]
    assert small.engine.num_preemptions > 0
    alone = [small.generate([p], q)[0].token_ids for p, q in zip(prompts[:3], params[:3])]
    assert [r.token_ids for r in results[:3]] == alone


def test_chat_applies_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hello!"}]
    result = llm.chat(messages, GREEDY)[0]
    assert result.prompt_token_ids == llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages))
    assert result.prompt_token_ids[-2:] == [llm.tokenizer.token_to_id("assistant"), 100266]
    two = llm.chat([messages, [{"role": "system", "content": "Hi"}, *messages]], GREEDY)
    assert two[0].token_ids == result.token_ids and len(two) == 2


@pytest.mark.parametrize(
    "kwargs, param",
    [({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
     ({"top_k": -1}, "top_k")],
)
def test_invalid_sampling_params_name_the_parameter(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_bad_prompts_are_refused(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[1, 2, 10**6]], GREEDY)
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[-1, 2]], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_stop_strings_end_the_text_before_them_also_when_streamed(llm: LLM) -> None:
    free_run = llm.generate("Stop strings", GREEDY)[0]
    # A stop string that spans two tokens: the end of token 3 and the start of token 4.
    pieces = [llm.tokenizer.decode([t], skip_special_tokens=True) for t in free_run.token_ids]
    start = len("".join(pieces[:3]))
    stop = free_run.text[start - 2 : start + 2]
    assert len(stop) == 4 and free_run.text.find(stop) == start - 2
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop, "never appears"))
    result = llm.generate("Stop strings", params)[0]
    assert result.finish_reason == "stop"
    assert result.text == free_run.text[: start - 2]
    assert result.token_ids == free_run.token_ids[:4]
    streamed = [o.new_text for o in llm.stream("Stop strings", params)]
    assert "".join(streamed) == result.text and not any(stop in piece for piece in streamed)


def test_logprobs_belong_to_the_returned_tokens(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=3, ignore_eos=True, logprobs=5)
    result = llm.generate("Logprobs", params)[0]
    assert result.logprobs is not None and len(result.logprobs) == 8
    for token, entry in zip(result.token_ids, result.logprobs):
        assert entry.token_id == token and entry.logprob <= 0.0
        assert len(entry.top) == 5 and entry.top[0][1] >= entry.logprob
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    greedy = llm.generate("Logprobs", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1))[0]
    assert all(entry.top[0][0] == entry.token_id for entry in greedy.logprobs or [])
