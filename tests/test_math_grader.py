"""MATH grading: simple-evals' answer extraction (markdown and prose around the answer), math-verify's
equivalence on tricky pairs, the time limit, and agreement with the expected verdicts of the grading corpus."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from phi4.eval.math_grader import HARD_SECONDS, MathGrader, extract_answer, last_boxed

CORPUS = Path(__file__).parent / "data" / "math_grading_corpus.json"


@pytest.fixture(scope="module")
def grader() -> Iterator[MathGrader]:
    grader = MathGrader()
    yield grader
    grader.close()


@pytest.mark.parametrize(("reply", "answer", "source"), [
    ("Let me compute.\n**Answer:** 42", "42", "answer line"),
    ("The sum is 40+2.\n**Answer: 42**", "42", "answer line"),
    ("We check each case.\nAnswer: The smallest such value is 12.", "The smallest such value is 12", "answer line"),
    ("Solving, we get \\(x = 5\\).\nAnswer: \\(x = 5\\)", "x = 5", "answer line"),
    ("First guess: Answer: 5\nRechecking...\nAnswer: 7", "7", "answer line"),
    ("so the total is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "boxed"),
    ("I could not finish.", "I could not finish.", "whole reply"),
    ("", None, "none"),
])
def test_the_answer_is_found_through_markdown_and_prose(reply: str, answer: str | None, source: str) -> None:
    assert extract_answer(reply) == (answer, source)


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize(("reference", "reply", "expected"), [
    # the hand-written grader's mistakes, observed in the audit
    ("\\text{even}", "Answer: \\text{odd}", False),
    ("[1,2]", "Answer: [1,2)", False),
    ("1000", "Answer: 1,000", True),
    ("-3, 2", "Answer: 2, -3", True),
    ("y=2x+3", "Answer: 2x+3=y", True),
    ("4\\pi\\sqrt{3}", "Answer: 4\\sqrt{3}\\pi", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "Answer: \\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "Answer: \\begin{pmatrix} 12 \\end{pmatrix}", False),
    # and the extraction's
    ("42", "Let me compute.\n**Answer:** 42", True),
    ("12", "We check each case.\nAnswer: The smallest such value is 12.", True),
    ("5", "Solving, we get \\(x = 5\\).\nAnswer: \\(x = 5\\)", True),
    ("7", "First guess: Answer: 5\nRechecking...\nAnswer: 7", True),
    ("\\frac{1}{2}", "The answer is $\\boxed{\\frac12}$.", True),
    ("4", "The answer is $\\boxed{}$.", False),
])
def test_known_hard_pairs(grader: MathGrader, reference: str, reply: str, expected: bool) -> None:
    assert grader.grade(reference, reply).correct is expected


def test_model_output_is_never_run_and_towers_are_not_computed(grader: MathGrader, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    assert not grader.grade("0", f"Answer: __import__('os').system('touch {canary}')").correct
    assert not canary.exists()
    for tower in ("2^10^10", "((9^999)^999)^999"):
        assert not grader.grade("1", f"Answer: {tower}").correct


def test_a_comparison_that_hangs_is_cut_off_and_the_grader_goes_on() -> None:
    impatient = MathGrader(hard_seconds=1.0)  # below math-verify's own limit: the worker itself is killed
    try:
        verdict = impatient.grade("(x+2)^{999}", "Answer: (x+1)^{999}")
        assert not verdict.correct and verdict.note == "no verdict within 1 s"
        assert impatient.grade("\\frac{3}{4}", "Answer: 0.75").correct  # a new worker takes the next one
    finally:
        impatient.close()
    assert HARD_SECONDS <= 30


def test_the_grader_agrees_with_the_corpus_on_at_least_95_percent(grader: MathGrader) -> None:
    corpus = json.loads(CORPUS.read_text())
    assert len(corpus) >= 150
    wrong = []
    for item in corpus:
        reply = item["candidate"] if item["category"] == "reply" else f"Answer: {item['candidate']}"
        if grader.grade(item["reference"], reply).correct is not item["equivalent"]:
            wrong.append((item["reference"], item["candidate"], item["equivalent"]))
    assert len(wrong) <= 0.05 * len(corpus), wrong
