"""MATH grading: simple-evals' answer extraction in front of math-verify (Hugging Face's maintained grader).

Extraction: markdown emphasis and code marks, `\\(...\\)` and `\\[...\\]` are stripped; then the last
`Answer:` line (simple-evals' pattern; the prompt asks for it on the last line), else the last `\\boxed{}`,
else the whole reply (math-verify then finds the final expression in it).

Equivalence: math-verify parses the reference and the answer (LaTeX and plain expressions: numbers,
fractions, radicals, sets, intervals, matrices, equations, text answers) and compares them symbolically.
It runs in a worker process of its own: math-verify's time limit is a SIGALRM, which only works on a main
thread, and a comparison that still hangs (sympy on `(x+1)^{999}`) is ended by killing the worker, which
is then replaced. The answer is wrapped as `$...$` when it is an expression; prose goes in as it is.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass

MATH_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")  # simple-evals' ANSWER_PATTERN
MARKDOWN = re.compile(r"\*\*|__|`|\\\(|\\\)|\\\[|\\\]")
PROSE = re.compile(r"[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){2,}")  # three words in a row: a sentence, not an expression
VERIFY_SECONDS = 5  # math-verify's own limit per parse and per comparison
HARD_SECONDS = 20  # past this the worker is killed
STARTUP_SECONDS = 120  # importing sympy on a busy machine


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}) in a solution, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[brace + 1 : index]
    return None


def extract_answer(response: str) -> tuple[str | None, str]:
    """(the answer, where it came from: "answer line", "boxed", "whole reply" or "none")."""
    text = MARKDOWN.sub("", response)
    lines = MATH_ANSWER.findall(text)
    if lines:
        return lines[-1].strip().rstrip(".").strip(), "answer line"
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    if text.strip():
        return text, "whole reply"
    return None, "none"


def _verify(reference: str, answer: str, whole_reply: bool) -> bool:
    from math_verify import parse, verify

    gold = parse(f"${reference}$", parsing_timeout=VERIFY_SECONDS)
    if whole_reply or PROSE.search(answer):
        predicted = parse(answer, parsing_timeout=VERIFY_SECONDS)
    else:
        predicted = (parse(f"${answer}$", parsing_timeout=VERIFY_SECONDS)
                     or parse(answer, parsing_timeout=VERIFY_SECONDS))
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=VERIFY_SECONDS,
                                              allow_set_relation_comp=True))


def serve() -> None:  # pragma: no cover - runs in the worker process
    """The worker: one JSON request per line on stdin ([reference, answer, whole_reply]), one verdict per line
    on stdout (["ok", bool] or ["error", message])."""
    import logging

    import math_verify  # noqa: F401 - imported (sympy, ANTLR) before the first verdict's clock starts

    logging.disable(logging.WARNING)  # math-verify logs every timeout and parse failure
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        reference, answer, whole_reply = json.loads(line)
        try:
            reply = ["ok", _verify(reference, answer, whole_reply)]
        except Exception as exc:  # noqa: BLE001 - an unparsable answer is a wrong answer, said why
            reply = ["error", f"{type(exc).__name__}: {exc}"[:300]]
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    source: str  # where the answer came from
    note: str | None = None  # a timeout or a parse failure


class MathGrader:
    """One math-verify worker process (`python -m phi4.eval.math_grader`), one comparison at a time
    (thread-safe)."""

    def __init__(self, hard_seconds: float = HARD_SECONDS) -> None:
        self.hard_seconds = hard_seconds
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None

    def _worker(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            process = subprocess.Popen([sys.executable, "-m", "phi4.eval.math_grader"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], STARTUP_SECONDS)
            if not ready or process.stdout.readline().strip() != "ready":
                process.kill()
                process.wait()
                raise RuntimeError(f"the math-verify worker did not start within {STARTUP_SECONDS} s; is "
                                   "math-verify installed?")
            self._process = process
        return self._process

    def grade(self, reference: str, response: str) -> Verdict:
        answer, source = extract_answer(response)
        if answer is None:
            return Verdict(False, None, source)
        with self._lock:
            worker = self._worker()
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(json.dumps([reference, answer, source == "whole reply"]) + "\n")
            worker.stdin.flush()
            ready, _, _ = select.select([worker.stdout], [], [], self.hard_seconds)
            line = worker.stdout.readline() if ready else ""
            if not line:
                self.close()
                return Verdict(False, answer, source, f"no verdict within {self.hard_seconds:g} s")
        status, value = json.loads(line)
        if status == "error":
            return Verdict(False, answer, source, value)
        return Verdict(bool(value), answer, source)

    def equivalent(self, reference: str, answer: str) -> bool:
        """Whether an answer already extracted is the reference (for tests and the grading benchmark)."""
        return self.grade(reference, f"Answer: {answer}").correct

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None


if __name__ == "__main__":
    serve()
