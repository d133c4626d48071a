"""lm-evaluation-harness against the server, as users run it: `local-completions` on a multiple-choice task
of our own. Its loglikelihoods come from prompt log-probabilities (`echo`, `logprobs`, `max_tokens: 1`)
and must equal what the offline `LLM` computes for the same tokens, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from live_server import MODEL, Server
from phi4 import LLM, SamplingParams

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five", " three and a half"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Fahrenheit"], "answer": 0},
]
TASK = """task: phi4_demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_multiple_choice_loglikelihoods_equal_offline_prompt_logprobs(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "phi4_demo_mc.yaml").write_text(TASK.format(data=data))
    model = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model=MODEL, tokenizer_backend="remote",
                                num_concurrent=1, max_retries=1, auth_token="test-key")
    results = lm_eval.simple_evaluate(model=model, tasks=["phi4_demo_mc"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    samples = results["samples"]["phi4_demo_mc"]
    assert len(samples) == len(QUESTIONS)

    llm = LLM("demo", max_model_len=1024)
    for sample in samples:
        for arguments, (loglikelihood, is_greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            context, continuation = arguments.values() if isinstance(arguments, dict) else arguments
            context_ids, continuation_ids = model._encode_pair(context, continuation)
            offline = llm.generate([context_ids + continuation_ids],
                                   SamplingParams(max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs
            expected = offline[len(context_ids):]
            assert loglikelihood == sum(entry.logprob for entry in expected)  # the same floats, summed in order
            assert loglikelihood < 0 and is_greedy == all(entry.rank == 1 for entry in expected)
