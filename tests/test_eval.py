"""`phi4 eval`: data formats and their errors, simple-evals' extraction per benchmark, GPQA's shuffles per
repeat, a scripted endpoint that is always right (100%) or always wrong (0%), HumanEval oracle and wrong
answers through the sandbox, trusted resume (settings header, torn lines), per-sample errors, one-line
endpoint errors, and an end-to-end run against `phi4 serve --model demo`. (The sandbox's hostile programs
are in test_sandbox.py, the MATH grader's pairs in test_math_grader.py.)"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from phi4.cli import main as cli_main
from phi4.eval.endpoint import EndpointError, OpenAIChatEndpoint, RequestFailed
from phi4.eval.multichoice import extract_choice
from phi4.eval.results import ResultsFile, ResumeMismatch, RunSettings
from phi4.eval.runner import evaluate, pass_at_k
from phi4.eval.tasks import TASKS, DataError, Sample, extract_code

MMLU_ROWS = [
    ["Find the degree of Q(sqrt(2)) over Q.", "0", "2", "4", "6", "B"],
    ["Which group has order 6?", "Z_4", "S_3", "Z_5", "A_4", "B"],
    ["2 + 2 = ?", "4", "5", "6", "7", "A"],
    ["The identity of a group is", "unique", "two", "none", "many", "A"],
]
GPQA_ROWS = [
    {"Record ID": f"rec{i}", "Question": f"Question {i}?", "Correct Answer": f"right {i}",
     "Incorrect Answer 1": f"wrong {i}a", "Incorrect Answer 2": f"wrong {i}b", "Incorrect Answer 3": f"wrong {i}c"}
    for i in range(6)
]
MATH_PROBLEMS = [
    ("algebra/1.json", "What is $1/2 + 1/4$?", "We add: $\\boxed{\\frac{3}{4}}$."),
    ("geometry/2.json", "Angle sum of a triangle?", "It is $\\boxed{180^\\circ}$."),
    ("algebra/3.json", "Solve $x^2 = 8$ for $x>0$.", "So $x = \\boxed{2\\sqrt{2}}$."),
]


@pytest.fixture()
def data(tmp_path: Path) -> dict[str, Path]:
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    with (mmlu / "abstract_algebra_test.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(MMLU_ROWS)
    gpqa = tmp_path / "gpqa_diamond.csv"
    with gpqa.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(GPQA_ROWS[0]))
        writer.writeheader()
        writer.writerows(GPQA_ROWS)
    math_dir = tmp_path / "MATH" / "test"
    for name, problem, solution in MATH_PROBLEMS:
        (math_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (math_dir / name).write_text(json.dumps({"problem": problem, "level": "Level 1", "type": "x",
                                                 "solution": solution}))
    return {"mmlu": mmlu, "gpqa": gpqa, "math": math_dir}


class ScriptedEndpoint:
    """Answers every prompt from a script; counts the calls."""

    def __init__(self, answer: dict[str, str]) -> None:
        self.answer = answer
        self.calls = 0

    async def complete(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
                       seed: int | None = None) -> str:
        self.calls += 1
        return self.answer[messages[-1]["content"]]


def correct_response(task: str, sample: Sample) -> str:
    if task in ("mmlu", "gpqa"):
        return f"Let me think step by step.\n**Answer: {sample.reference}**"
    if task == "math":
        return f"Working...\nAnswer: {sample.reference}"
    problem = sample.reference
    signature = problem["prompt"][problem["prompt"].index(f"def {problem['entry_point']}"):].split("\n")[0]
    body = problem["canonical_solution"].lstrip()  # a few start with blank lines; a model's answer would not
    return f"Here you go:\n```python\n{signature}\n    {body}```"


def wrong_response(task: str, sample: Sample) -> str:
    if task in ("mmlu", "gpqa"):
        return "Answer: " + ("C" if sample.reference != "C" else "D")
    if task == "math":
        return "Answer: 12345"
    return "```python\ndef nothing():\n    return None\n```"


def load(task: str, data: dict[str, Path], repeats: int = 1) -> list[Sample]:
    questions = TASKS[task].load(data.get(task)).samples
    return TASKS[task].expand(questions[:6] if task == "humaneval" else questions, repeats, None)


@pytest.mark.parametrize("task", ["mmlu", "gpqa", "math", "humaneval"])
def test_an_always_right_endpoint_scores_100_and_an_always_wrong_one_0(task: str, data: dict[str, Path]) -> None:
    samples = load(task, data)
    for respond, expected in ((correct_response, 100.0), (wrong_response, 0.0)):
        endpoint = ScriptedEndpoint({s.prompt: respond(task, s) for s in samples})
        summary = asyncio.run(evaluate(TASKS[task], endpoint, samples, progress=False))
        assert summary.score == expected and summary.num_samples == len(samples)
        assert endpoint.calls == len(samples)


def test_mmlu_prompt_and_extraction_follow_simple_evals(data: dict[str, Path]) -> None:
    sample = load("mmlu", data)[0]
    assert sample.prompt.startswith("Answer the following multiple choice question.")
    assert sample.prompt.endswith("A) 0\nB) 2\nC) 4\nD) 6") and sample.id == "abstract_algebra/0"
    assert extract_choice("mmlu", "blah\nAnswer: C") == "C"
    assert extract_choice("mmlu", "answer:$B$") == "B"
    assert extract_choice("mmlu", "**Answer:** D") == "D"
    assert extract_choice("mmlu", "Answer: \\boxed{B}") == "B" and extract_choice("mmlu", "Answer: \\text{B}") == "B"
    assert extract_choice("mmlu", "答案：Ｃ") == "C"
    assert extract_choice("mmlu", "I think it is B") is None


@pytest.mark.parametrize(("bench", "reply", "credited"), [
    ("mmlu", "The answer: **b**ecause B is right", False),  # no upper-casing: 'b' is not B
    ("mmlu", "answer: b", False),
    ("gpqa", "answer: b", False),
    ("mmlu", "Answer: \\boxed{B}", True),
    ("gpqa", "Answer: \\boxed{B}", False),  # GPQA: simple-evals' plain pattern on the raw reply
    ("mmlu", "**Answer:** B", True),
    ("gpqa", "**Answer:** B", False),
    ("gpqa", "**Answer: B**", True),
    ("gpqa", "Answer: $B$", True),
])
def test_multiple_choice_credit_matches_simple_evals(bench: str, reply: str, credited: bool) -> None:
    assert (extract_choice(bench, reply) == "B") is credited


def test_lenient_extraction_is_opt_in_and_accepts_more_forms() -> None:
    for reply in ("The answer is (B).", "**Answer:** B", "I pick\n**B**", "Answer: \\boxed{B}"):
        assert extract_choice("gpqa", reply, "lenient") == "B"
    assert extract_choice("gpqa", "the answer is a tricky one", "lenient") is None
    with pytest.raises(ValueError, match="unknown extraction"):
        extract_choice("mmlu", "Answer: B", "loose")


def test_gpqa_shuffles_as_simple_evals_with_a_new_order_per_repeat(data: dict[str, Path]) -> None:
    first, second = load("gpqa", data, repeats=3), load("gpqa", data, repeats=3)
    assert [s.prompt for s in first] == [s.prompt for s in second] and len(first) == 3 * len(GPQA_ROWS)
    assert len({s.reference for s in first}) > 1, "the right answer is not always in the same place"
    rng = random.Random(0)  # simple-evals: examples * n_repeats, then one permutation each from the same rng
    for sample, row in zip(first, GPQA_ROWS * 3):
        order = rng.sample(range(4), 4)
        assert sample.reference == "ABCD"[order.index(0)] and sample.id == row["Record ID"]
        assert f"{sample.reference}) {row['Correct Answer']}" in sample.prompt
    by_question: dict[str, set[str]] = {}
    for sample in first:
        by_question.setdefault(sample.id, set()).add(sample.prompt)
    assert any(len(prompts) > 1 for prompts in by_question.values()), "repeats see other orders"
    subset = TASKS["gpqa"].expand(TASKS["gpqa"].load(data["gpqa"]).samples, 1, 2)
    expected = {row["Record ID"] for row in random.Random(0).sample(GPQA_ROWS, 2)}
    assert len(subset) == 2 and {s.id for s in subset} == expected


def test_humaneval_extraction_and_pass_at_k() -> None:
    response = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(response) == "    return a + b\n"
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 5) == 1.0


def test_humaneval_repeats_give_pass_at_k() -> None:
    samples = TASKS["humaneval"].expand(TASKS["humaneval"].load(None).samples[:2], 3, None)
    first = samples[0]
    calls: dict[str, int] = {}

    class FirstTryOnlyOnTheFirstProblem:
        async def complete(self, messages, *, temperature, max_tokens, seed=None):  # type: ignore[no-untyped-def]
            prompt = messages[-1]["content"]
            calls[prompt] = calls.get(prompt, 0) + 1
            if prompt == first.prompt and calls[prompt] == 1:
                return correct_response("humaneval", first)
            return wrong_response("humaneval", first)

    summary = asyncio.run(evaluate(TASKS["humaneval"], FirstTryOnlyOnTheFirstProblem(), samples, concurrency=1,
                                   progress=False))
    assert summary.pass_at_k[1] == pytest.approx(100 * (1 / 3) / 2)  # 1 of 3 on one problem, 0 on the other
    assert summary.pass_at_k[3] == pytest.approx(50.0)


def settings(**changes: Any) -> RunSettings:
    base = {"benchmark": "mmlu", "model": "m", "temperature": 0.5, "max_tokens": 1024, "repeats": 1, "limit": None,
            "seed": None, "extraction": "simple-evals", "timeout_seconds": 3.0, "data_sha256": "abc"}
    return RunSettings(**(base | changes))


def run_with_results(samples: list[Sample], endpoint: Any, path: Path, run_settings: RunSettings,
                     fresh: bool = False) -> Any:
    results = ResultsFile.open(path, run_settings, fresh)
    try:
        return asyncio.run(evaluate(TASKS["mmlu"], endpoint, samples, results=results, progress=False))
    finally:
        results.close()


def test_results_start_with_the_settings_and_a_rerun_resumes_past_a_torn_line(
    data: dict[str, Path], tmp_path: Path
) -> None:
    samples = load("mmlu", data)
    output = tmp_path / "results.jsonl"
    right = {s.prompt: correct_response("mmlu", s) for s in samples}
    run_with_results(samples[:2], ScriptedEndpoint(right), output, settings())
    lines = output.read_text().splitlines()
    assert json.loads(lines[0]) == {"type": "header", "format": "phi4-eval/1", **settings().__dict__}
    assert len(lines) == 3
    with output.open("a") as handle:
        handle.write('{"id": "abstract_algebra/2", "rep')  # a line cut short by a crash
    endpoint = ScriptedEndpoint(right)
    summary = run_with_results(samples, endpoint, output, settings())
    assert endpoint.calls == 2 and summary.score == 100.0 and summary.num_samples == 4
    records = [json.loads(line) for line in output.read_text().splitlines()]  # every line parses again
    assert sorted(r["id"] for r in records[1:]) == sorted(s.id for s in samples)


def test_a_resume_with_other_settings_refuses_unless_fresh(data: dict[str, Path], tmp_path: Path) -> None:
    samples = load("mmlu", data)[:2]
    output = tmp_path / "results.jsonl"
    right = {s.prompt: correct_response("mmlu", s) for s in samples}
    run_with_results(samples, ScriptedEndpoint(right), output, settings(temperature=0.5))
    with pytest.raises(ResumeMismatch, match="temperature 0.5 there, 0.0 now"):
        run_with_results(samples, ScriptedEndpoint(right), output, settings(temperature=0.0))
    with pytest.raises(ResumeMismatch, match="data_sha256"):
        run_with_results(samples, ScriptedEndpoint(right), output, settings(data_sha256="other"))
    endpoint = ScriptedEndpoint(right)
    run_with_results(samples, endpoint, output, settings(temperature=0.0), fresh=True)
    assert endpoint.calls == 2 and json.loads(output.read_text().splitlines()[0])["temperature"] == 0.0
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": "x", "repeat": 0, "score": 1.0}\n')
    with pytest.raises(ResumeMismatch, match="no phi4 eval settings header"):
        run_with_results(samples, endpoint, foreign, settings())


class FailsOn(ScriptedEndpoint):
    """Right on every prompt but one, which fails as an endpoint does after its retries."""

    def __init__(self, answer: dict[str, str], failing_prompt: str) -> None:
        super().__init__(answer)
        self.failing_prompt = failing_prompt

    async def complete(self, messages: list[dict[str, str]], **options: Any) -> str:
        if messages[-1]["content"] == self.failing_prompt:
            raise RequestFailed("failed after 5 attempts; last: 503: overloaded")
        return await super().complete(messages, **options)


def test_a_request_that_keeps_failing_is_an_error_for_its_sample_only(data: dict[str, Path], tmp_path: Path) -> None:
    samples = load("mmlu", data)
    right = {s.prompt: correct_response("mmlu", s) for s in samples}
    output = tmp_path / "results.jsonl"
    summary = run_with_results(samples, FailsOn(right, samples[1].prompt), output, settings())
    assert summary.errors == 1 and summary.num_samples == 3 and summary.score == 100.0  # not counted as wrong
    assert "1 answers errored" in summary.table()
    errored = [json.loads(line) for line in output.read_text().splitlines()[1:] if "error" in json.loads(line)]
    assert [r["id"] for r in errored] == [samples[1].id] and "503" in errored[0]["error"]
    endpoint = ScriptedEndpoint(right)  # the resume asks the errored sample again, and only it
    summary = run_with_results(samples, endpoint, output, settings())
    assert endpoint.calls == 1 and summary.errors == 0 and summary.num_samples == 4


def mock_endpoint(handler: Any, **options: Any) -> OpenAIChatEndpoint:
    return OpenAIChatEndpoint("http://endpoint.test/v1", "key", transport=httpx.MockTransport(handler),
                              backoff_seconds=0.0, **options)


def test_the_endpoint_retries_busy_answers_then_fails_the_one_request() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        if len(attempts) < 3:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return httpx.Response(200, json={"choices": [{"message": {"content": "Answer: B"}}]})

    async def ask(endpoint: OpenAIChatEndpoint) -> str:
        try:
            return await endpoint.complete([{"role": "user", "content": "q"}], temperature=0.5, max_tokens=8, seed=7)
        finally:
            await endpoint.close()

    assert asyncio.run(ask(mock_endpoint(handler, model="m"))) == "Answer: B" and len(attempts) == 3
    always_busy = mock_endpoint(lambda request: httpx.Response(500, text="boom"), model="m", retries=2)
    with pytest.raises(RequestFailed, match="after 3 attempts; last: 500: boom"):
        asyncio.run(ask(always_busy))
    refused = mock_endpoint(lambda request: httpx.Response(401, json={"error": {"message": "bad key"}}), model="m")
    with pytest.raises(EndpointError, match="refused the API key \\(401: bad key\\)"):
        asyncio.run(ask(refused))


def test_endpoint_down_and_a_wrong_key_are_one_line_each(
    capsys: pytest.CaptureFixture[str], data: dict[str, Path], server: Any
) -> None:
    code = cli_main(["eval", "mmlu", "--data", str(data["mmlu"]), "--base-url", "http://127.0.0.1:9/v1"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and error.startswith("phi4 eval: cannot reach http://127.0.0.1:9/v1") and "\n" not in error
    code = cli_main(["eval", "mmlu", "--data", str(data["mmlu"]), "--base-url", f"{server.url}/v1", "--api-key",
                     "wrong-key"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and "refused the API key (401" in error and "Traceback" not in error


@pytest.mark.parametrize(("bench", "content", "message"), [
    ("mmlu", "", "holds no samples"),
    ("mmlu", "What?,1,2,3,4,E\n", "an answer letter A-D"),
    ("mmlu", "What?,1,2\n", "an answer letter A-D"),
    ("gpqa", "Question,Correct Answer\nq,a\n", "lacks the columns"),
    ("gpqa", ",".join(GPQA_ROWS[0]) + "\nr1,q?,right,,w2,w3\n", "a question and four answers"),
    ("math", '{"problem": "1+1?"}\n', "lacks a problem or an answer"),
    ("math", "{not json\n", "not JSON"),
    ("math", "", "holds no samples"),
])
def test_malformed_or_empty_data_is_one_clear_message(
    bench: str, content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / {"mmlu": "x_test.csv", "gpqa": "gpqa.csv", "math": "test.jsonl"}[bench]
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        TASKS[bench].load(path)
    assert cli_main(["eval", bench, "--data", str(path), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert message in capsys.readouterr().err


def test_missing_data_is_one_clear_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for bench, hint in (("mmlu", "_test.csv"), ("gpqa", "gpqa_diamond.csv"), ("math", "MATH/test")):
        assert cli_main(["eval", bench, "--data", str(tmp_path / "nowhere"), "--base-url", "http://127.0.0.1:9"]) == 2
        assert hint in capsys.readouterr().err
    start = time.monotonic()
    assert cli_main(["eval", "math", "--base-url", "http://127.0.0.1:9"]) == 2  # no --data: the Hub, offline here
    error = capsys.readouterr().err
    assert "--data" in error and "HuggingFaceH4/MATH-500" in error and time.monotonic() - start < 30


def test_end_to_end_against_the_demo_server_scores_about_chance(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "demo-mmlu.jsonl"
    code = cli_main(["eval", "mmlu", "--model", "demo", "--max-model-len", "2048", "--data", str(data["mmlu"]),
                     "--max-tokens", "24", "--concurrency", "4", "--seed", "3", "--output", str(output)])
    assert code == 0
    header, *records = [json.loads(line) for line in output.read_text().splitlines()]
    assert header["type"] == "header" and header["model"] == "microsoft/phi-4" and header["seed"] == 3
    assert len(records) == len(MMLU_ROWS) and all(r["response"] for r in records)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["benchmark"] == "mmlu" and summary["published"] == 84.8 and summary["errors"] == 0
    assert 0.0 <= summary["score"] <= 50.0  # random weights: chance (25%) or below, never better
    log = output.with_name(output.name + ".server.log")  # the server's output went to a file, not a pipe
    assert "Uvicorn running on http://127.0.0.1:" in log.read_text()  # where it listens, as uvicorn says it


def test_without_bubblewrap_the_sandbox_says_so_once_and_still_isolates_the_network(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from phi4.eval import sandbox

    monkeypatch.setattr(sandbox, "bubblewrap", lambda: None)
    monkeypatch.setattr(sandbox, "_warned", False)
    marker = sandbox.new_marker()
    with caplog.at_level("WARNING", logger="phi4.eval"):
        results = [sandbox.run_python(f"print('hi')\nprint({marker!r})", marker=marker) for _ in range(2)]
        blocked = sandbox.run_python("import socket\nsocket.socket()\nprint('made a socket')")
    assert all(r.passed and r.isolation == "limits" for r in results)
    assert not blocked.passed and "made a socket" not in blocked.output
    assert sum("bubblewrap" in record.message for record in caplog.records) == 1
