"""`phi4 eval`: extraction and scoring on the benchmarks' public formats, a scripted endpoint that is always
right (100%) or always wrong (0%), resumption, the code sandbox against hostile programs, and an
end-to-end run against `phi4 serve --model demo`."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from phi4.cli import main as cli_main
from phi4.eval.math_equivalence import answers_match, last_boxed
from phi4.eval.runner import evaluate, pass_at_k
from phi4.eval.sandbox import SandboxLimits, run_python
from phi4.eval.tasks import TASKS, Sample, extract_choice, extract_code

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

    async def complete(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
        self.calls += 1
        return self.answer[messages[-1]["content"]]


def correct_response(task: str, sample: Sample) -> str:
    if task in ("mmlu", "gpqa"):
        return f"Let me think step by step.\n**Answer: {sample.reference}**"
    if task == "math":
        return f"Working...\nAnswer: {sample.reference}"
    problem = sample.reference
    signature = problem["prompt"][problem["prompt"].index(f"def {problem['entry_point']}"):].split("\n")[0]
    return f"Here you go:\n```python\n{signature}\n{problem['canonical_solution']}```"


def wrong_response(task: str, sample: Sample) -> str:
    if task in ("mmlu", "gpqa"):
        return "Answer: " + ("C" if sample.reference != "C" else "D")
    if task == "math":
        return "Answer: 12345"
    return "```python\ndef nothing():\n    return None\n```"


def load(task: str, data: dict[str, Path]) -> list[Sample]:
    samples = TASKS[task].load(data.get(task))
    return samples[:6] if task == "humaneval" else samples


@pytest.mark.parametrize("task", ["mmlu", "gpqa", "math", "humaneval"])
def test_an_always_right_endpoint_scores_100_and_an_always_wrong_one_0(task: str, data: dict[str, Path]) -> None:
    samples = load(task, data)
    for respond, expected in ((correct_response, 100.0), (wrong_response, 0.0)):
        endpoint = ScriptedEndpoint({s.prompt: respond(task, s) for s in samples})
        summary = asyncio.run(evaluate(TASKS[task], endpoint, samples, progress=False))
        assert summary.score == expected and summary.num_samples == len(samples)
        assert endpoint.calls == len(samples)


def test_mmlu_prompt_and_extraction_follow_simple_evals(data: dict[str, Path]) -> None:
    sample = TASKS["mmlu"].load(data["mmlu"])[0]
    assert sample.prompt.startswith("Answer the following multiple choice question.")
    assert sample.prompt.endswith("A) 0\nB) 2\nC) 4\nD) 6") and sample.id == "abstract_algebra/0"
    assert extract_choice("blah\nAnswer: C") == "C"
    assert extract_choice("answer:$B$") == "B"
    assert extract_choice("**Answer:** D") == "D"
    assert extract_choice("I think it is B") is None


def test_gpqa_choices_are_shuffled_with_a_fixed_seed(data: dict[str, Path]) -> None:
    first, second = TASKS["gpqa"].load(data["gpqa"]), TASKS["gpqa"].load(data["gpqa"])
    assert [s.prompt for s in first] == [s.prompt for s in second]
    assert len({s.reference for s in first}) > 1, "the right answer is not always in the same place"
    for sample, row in zip(first, GPQA_ROWS):
        letter = sample.reference
        assert f"{letter}) {row['Correct Answer']}" in sample.prompt


def test_math_answers_are_compared_by_normalisation_and_symbolically() -> None:
    assert last_boxed("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.") == "\\frac{1}{\\sqrt{2}}"
    for a, b in [("\\frac{1}{2}", "0.5"), ("\\dfrac12", "1/2"), ("x = 3", "3"), ("\\left( 1, 2 \\right)", "(1,2)"),
                 ("10\\%", "10"), ("90^\\circ", "90"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\text{(B)}", "B"),
                 ("\\$5", "5"), ("\\frac{\\pi}{2}", "\\pi/2")]:
        assert answers_match(a, b), (a, b)
    for a, b in [("4", "5"), ("(1,2)", "(2,1)"), ("\\sqrt{2}", "2")]:
        assert not answers_match(a, b), (a, b)
    # Model output is never evaluated as Python, and no huge computation is attempted.
    assert not answers_match("__import__('os').system('touch /tmp/phi4-pwned')", "0")
    assert not os.path.exists("/tmp/phi4-pwned")
    for tower in ("2^(10^10)", "2^10^10", "((9^999)^999)^999"):
        assert not answers_match(tower, "1")
    assert answers_match("x^2+2x+1", "(x+1)^2") and answers_match("9^99", "3^198")


def test_humaneval_extraction_and_pass_at_k() -> None:
    response = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(response) == "    return a + b\n"
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 5) == 1.0


def test_humaneval_repeats_give_pass_at_k() -> None:
    samples = TASKS["humaneval"].load(None)[:2]
    calls: dict[str, int] = {}

    class FirstTryOnlyOnTheFirstProblem:
        async def complete(self, messages, temperature, max_tokens):  # type: ignore[no-untyped-def]
            prompt = messages[-1]["content"]
            calls[prompt] = calls.get(prompt, 0) + 1
            if prompt == samples[0].prompt and calls[prompt] == 1:
                return correct_response("humaneval", samples[0])
            return wrong_response("humaneval", samples[0])

    summary = asyncio.run(evaluate(TASKS["humaneval"], FirstTryOnlyOnTheFirstProblem(), samples, repeats=3,
                                   concurrency=1, progress=False))
    assert summary.pass_at_k[1] == pytest.approx(100 * (1 / 3) / 2)  # 1 of 3 on one problem, 0 on the other
    assert summary.pass_at_k[3] == pytest.approx(50.0)


def test_results_are_written_as_they_come_and_a_rerun_resumes(data: dict[str, Path], tmp_path: Path) -> None:
    samples = TASKS["mmlu"].load(data["mmlu"])
    output = tmp_path / "results.jsonl"
    right = {s.prompt: correct_response("mmlu", s) for s in samples}
    asyncio.run(evaluate(TASKS["mmlu"], ScriptedEndpoint(right), samples[:2], output=output, progress=False))
    assert len(output.read_text().splitlines()) == 2
    with output.open("a") as handle:
        handle.write('{"id": "abstract_algebra/2", "rep')  # a line cut short by a crash
    endpoint = ScriptedEndpoint(right)
    summary = asyncio.run(evaluate(TASKS["mmlu"], endpoint, samples, output=output, progress=False))
    assert endpoint.calls == 2 and summary.score == 100.0


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


# The sandbox: hostile completions cannot hurt the host.

LIMITS = SandboxLimits(timeout_seconds=5.0, cpu_seconds=5)


def sandbox_processes() -> int:
    if os.geteuid() != 0:
        return 0
    out = subprocess.run(["ps", "-u", "65534", "-o", "pid="], capture_output=True, text=True).stdout
    return len(out.split())


def test_a_fork_bomb_is_contained() -> None:
    baseline = sandbox_processes()  # nobody may own unrelated processes on this host
    start = time.monotonic()
    result = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", LIMITS)
    assert not result.passed and time.monotonic() - start < LIMITS.timeout_seconds + 5
    deadline = time.monotonic() + 10
    while sandbox_processes() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() <= baseline, "every process it started is gone"
    assert run_python("print('still works')", LIMITS).passed


def test_an_endless_loop_is_stopped() -> None:
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", LIMITS)
    assert not result.passed and time.monotonic() - start < LIMITS.timeout_seconds + 3


def test_a_memory_hog_is_refused() -> None:
    result = run_python("blob = bytearray(8 << 30)\nprint('allocated')\n", LIMITS)
    assert not result.passed and "allocated" not in result.output


def test_rm_rf_home_cannot_touch_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    program = (f"import os, shutil\nshutil.rmtree(os.path.expanduser('~'), ignore_errors=True)\n"
               f"os.system('rm -rf ~ {home}')\nshutil.rmtree({str(home)!r})\n")
    run_python(program, LIMITS)
    assert (home / "precious.txt").read_text() == "keep me"


def test_the_network_is_unreachable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "s.sendall(b'leak')\nprint('connected')\n")
        result = run_python(program, LIMITS)
        assert not result.passed and "connected" not in result.output
        with pytest.raises(socket.timeout):
            listener.accept()


def test_end_to_end_against_the_demo_server_scores_about_chance(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "demo-mmlu.jsonl"
    code = cli_main(["eval", "mmlu", "--model", "demo", "--max-model-len", "2048", "--data", str(data["mmlu"]),
                     "--max-tokens", "24", "--concurrency", "4", "--output", str(output)])
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(MMLU_ROWS) and all(r["response"] for r in records)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["benchmark"] == "mmlu" and summary["published"] == 84.8
    assert 0.0 <= summary["score"] <= 50.0  # random weights: chance (25%) or below, never better
