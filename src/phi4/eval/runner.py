"""Run a task against an endpoint: concurrent requests, results written as they come (a re-run with the same
settings resumes), a progress bar, and a summary with its standard error.

A request that still fails after the endpoint's retries, or an answer whose scoring breaks, is recorded as
an error for that sample: counted apart from right and wrong, and asked again on a resume. Only what
makes every request fail (the endpoint refusing the key) ends the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
import traceback
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from phi4.eval.endpoint import ChatEndpoint, RequestFailed
from phi4.eval.results import ResultsFile
from phi4.eval.tasks import Sample, Scoring, Task


@dataclass(frozen=True)
class Summary:
    task: Task
    num_samples: int  # questions with at least one scored answer
    repeats: int
    answers: int  # answers scored
    errors: int  # answers that could not be had or scored
    score: float  # mean over questions of the per-question mean (pass@1 for HumanEval), in percent
    stderr: float  # standard error of that mean, in percent
    pass_at_k: dict[int, float]  # HumanEval with repeats: unbiased pass@k, in percent
    extraction: str = "simple-evals"

    def table(self) -> str:
        lines = [f"{'benchmark':<14}{'samples':>8}{'repeats':>8}{'errors':>8}{'score':>9}{'± s.e.':>9}"
                 f"{'Phi-4 (paper)':>15}",
                 f"{self.task.title:<14}{self.num_samples:>8}{self.repeats:>8}{self.errors:>8}{self.score:>9.1f}"
                 f"{self.stderr:>9.1f}{self.task.published:>15.1f}"]
        lines += [f"{'':<14}pass@{k}: {value:.1f}" for k, value in sorted(self.pass_at_k.items()) if k > 1]
        if self.extraction != "simple-evals":
            lines.append(f"answers extracted with --extraction {self.extraction}: not comparable to simple-evals")
        if self.errors:
            lines.append(f"{self.errors} answers errored (see 'error' in the results); they are not in the score")
        return "\n".join(lines)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def request_seed(seed: int | None, sample: Sample) -> int | None:
    """A seed of its own for every (question, repeat), derived from the run's: repeats differ, re-runs agree."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}/{sample.id}/{sample.repeat}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


async def evaluate(
    task: Task,
    endpoint: ChatEndpoint,
    samples: list[Sample],
    *,
    scoring: Scoring | None = None,
    concurrency: int = 8,
    temperature: float = 0.5,
    max_tokens: int | None = None,
    seed: int | None = None,
    results: ResultsFile | None = None,
    progress: bool = True,
) -> Summary:
    """Answer and score every sample (`samples` as `task.expand` made them: one per question and repeat)."""
    scoring = scoring or Scoring()
    done: dict[tuple[str, int], dict[str, Any]] = dict(results.done) if results is not None else {}
    errors: dict[tuple[str, int], dict[str, Any]] = {}
    todo = [s for s in samples if (s.id, s.repeat) not in done]
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=task.title, disable=not progress,
               unit="answer")

    async def one(sample: Sample) -> None:
        key = (sample.id, sample.repeat)
        record: dict[str, Any] = {"id": sample.id, "repeat": sample.repeat}
        try:
            async with semaphore:
                response = await endpoint.complete([{"role": "user", "content": sample.prompt}],
                                                   temperature=temperature, max_tokens=max_tokens or task.max_tokens,
                                                   seed=request_seed(seed, sample))
        except RequestFailed as exc:
            record["error"] = str(exc)
        else:
            try:  # HumanEval runs code and MATH waits on its grader: off the event loop
                record.update(await asyncio.to_thread(task.score, sample, response, scoring))
            except Exception as exc:  # noqa: BLE001 - this answer errors, the run goes on
                record["error"] = f"scoring failed: {type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc(limit=5)
            record["response"] = response
        (errors if "error" in record else done)[key] = record
        if results is not None:
            results.append(record)
        bar.update(1)

    try:
        await asyncio.gather(*(one(sample) for sample in todo))
    finally:
        bar.close()
    return summarize(task, samples, done, len(errors), scoring.extraction)


def summarize(task: Task, samples: list[Sample], done: dict[tuple[str, int], dict[str, Any]], errors: int,
              extraction: str = "simple-evals") -> Summary:
    scores: dict[str, list[float]] = {}
    for sample in samples:
        record = done.get((sample.id, sample.repeat))
        scores.setdefault(sample.id, [])
        if record is not None:
            scores[sample.id].append(record["score"])
    repeats = max((s.repeat for s in samples), default=0) + 1
    per_question = [statistics.fmean(values) for values in scores.values() if values]
    n = len(per_question)
    mean = statistics.fmean(per_question) if n else 0.0
    stderr = statistics.stdev(per_question) / math.sqrt(n) if n > 1 else 0.0
    at_k: dict[int, float] = {}
    if task.name == "humaneval" and n:
        complete = [values for values in scores.values() if len(values) == repeats]
        for k in sorted({1, repeats}):
            if complete:
                at_k[k] = 100 * statistics.fmean(pass_at_k(repeats, int(sum(v)), k) for v in complete)
    return Summary(task, n, repeats, sum(len(v) for v in scores.values()), errors, 100 * mean, 100 * stderr, at_k,
                   extraction)
