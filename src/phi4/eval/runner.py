"""Run a task against an endpoint: concurrent requests, results written as they come (a re-run resumes
where the last one stopped), a progress bar, and a summary with its standard error."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phi4.eval.endpoint import ChatEndpoint
from phi4.eval.tasks import Sample, Task


@dataclass(frozen=True)
class Summary:
    task: Task
    num_samples: int
    repeats: int
    score: float  # mean over samples of the per-sample mean (pass@1 for HumanEval), in percent
    stderr: float  # standard error of that mean, in percent
    pass_at_k: dict[int, float]  # HumanEval with repeats: unbiased pass@k, in percent

    def table(self) -> str:
        lines = [f"{'benchmark':<14}{'samples':>8}{'repeats':>8}{'score':>9}{'± s.e.':>9}{'Phi-4 (paper)':>15}",
                 f"{self.task.title:<14}{self.num_samples:>8}{self.repeats:>8}{self.score:>9.1f}{self.stderr:>9.1f}"
                 f"{self.task.published:>15.1f}"]
        lines += [f"{'':<14}pass@{k}: {value:.1f}" for k, value in sorted(self.pass_at_k.items()) if k > 1]
        return "\n".join(lines)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def _load_done(output: Path | None) -> dict[tuple[str, int], dict[str, Any]]:
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if output is not None and output.exists():
        for line in output.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the last run stopped
            done[(record["id"], record["repeat"])] = record
    return done


async def evaluate(
    task: Task,
    endpoint: ChatEndpoint,
    samples: list[Sample],
    *,
    repeats: int = 1,
    concurrency: int = 8,
    temperature: float = 0.5,
    max_tokens: int | None = None,
    output: Path | None = None,
    progress: bool = True,
) -> Summary:
    done = _load_done(output)
    todo = [(s, r) for s in samples for r in range(repeats) if (s.id, r) not in done]
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(samples) * repeats, initial=len(samples) * repeats - len(todo), desc=task.title,
               disable=not progress, unit="answer")
    sink = output.open("a", encoding="utf-8") if output is not None else None

    async def one(sample: Sample, repeat: int) -> None:
        async with semaphore:
            response = await endpoint.complete([{"role": "user", "content": sample.prompt}], temperature,
                                               max_tokens or task.max_tokens)
        result = await asyncio.to_thread(task.score, sample, response)  # HumanEval runs code: off the loop
        record = {"id": sample.id, "repeat": repeat, **result, "response": response}
        done[(sample.id, repeat)] = record
        if sink is not None:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
        bar.update(1)

    try:
        await asyncio.gather(*(one(sample, repeat) for sample, repeat in todo))
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return summarize(task, samples, repeats, done)


def summarize(task: Task, samples: list[Sample], repeats: int, done: dict[tuple[str, int], dict[str, Any]]) -> Summary:
    per_sample = []
    correct_counts = []
    for sample in samples:
        scores = [done[(sample.id, r)]["score"] for r in range(repeats) if (sample.id, r) in done]
        per_sample.append(statistics.fmean(scores) if scores else 0.0)
        correct_counts.append(int(sum(scores)))
    n = len(per_sample)
    mean = statistics.fmean(per_sample) if per_sample else 0.0
    stderr = statistics.stdev(per_sample) / math.sqrt(n) if n > 1 else 0.0
    ks = sorted({1, repeats}) if task.name == "humaneval" else []
    at_k = {k: 100 * statistics.fmean(pass_at_k(repeats, c, k) for c in correct_counts) for k in ks if n}
    return Summary(task, n, repeats, 100 * mean, 100 * stderr, at_k)
