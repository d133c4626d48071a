"""`phi4 eval`: load the data, reach (or start) the endpoint, run, print the table and one JSON summary line.

Exit status: 0 when every answer was had and scored, 1 when some errored or the endpoint failed as a whole,
2 when the data or the results file stop the run before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from phi4.eval.endpoint import EndpointError, OpenAIChatEndpoint, local_server
from phi4.eval.results import ResultsFile, ResumeMismatch, RunSettings
from phi4.eval.runner import Summary, evaluate
from phi4.eval.tasks import TASKS, DataError, Scoring


@dataclass(frozen=True)
class EvalOptions:
    bench: str
    base_url: str | None = None
    api_key: str | None = None
    served_model: str | None = None
    model: str | None = None  # without base_url: serve this model for the run
    max_model_len: int | None = None
    data: Path | None = None
    limit: int | None = None
    concurrency: int = 8
    repeats: int = 1
    temperature: float = 0.5
    max_tokens: int | None = None
    seed: int | None = None
    extraction: str = "simple-evals"
    timeout_seconds: float = 3.0
    output: Path | None = None
    fresh: bool = False


def _fail(message: str, code: int) -> int:
    print(f"phi4 eval: {message}", file=sys.stderr)
    return code


def run_eval(options: EvalOptions) -> int:
    task = TASKS[options.bench]
    if options.repeats < 1 or (options.limit is not None and options.limit < 1) or options.concurrency < 1:
        return _fail("--repeats, --limit and --concurrency must be at least 1", 2)
    try:
        dataset = task.load(options.data)
    except DataError as exc:
        return _fail(str(exc), 2)
    samples = task.expand(dataset.samples, options.repeats, options.limit)
    with contextlib.ExitStack() as stack:
        try:
            if options.base_url:
                base_url = options.base_url
            else:
                log = (options.output.with_name(options.output.name + ".server.log") if options.output else
                       Path(tempfile.mkstemp(prefix="phi4-eval-server-", suffix=".log")[1]))
                print(f"phi4 eval: serving {options.model or 'demo'} for the run (log: {log})", file=sys.stderr)
                base_url = stack.enter_context(local_server(options.model or "demo", log, options.max_model_len))
        except EndpointError as exc:
            return _fail(str(exc), 1)
        endpoint = OpenAIChatEndpoint(base_url, options.api_key, options.served_model)
        scoring = Scoring(options.extraction, options.timeout_seconds)
        stack.callback(scoring.close)
        try:
            summary = asyncio.run(_run(task, endpoint, samples, scoring, options, dataset.fingerprint()))
        except (EndpointError, ResumeMismatch) as exc:
            return _fail(str(exc), 1 if isinstance(exc, EndpointError) else 2)
    print(summary.table())
    print(json.dumps({"benchmark": task.name, "samples": summary.num_samples, "repeats": summary.repeats,
                      "answers": summary.answers, "errors": summary.errors, "score": round(summary.score, 2),
                      "stderr": round(summary.stderr, 2), "published": task.published,
                      "extraction": summary.extraction,
                      **{f"pass@{k}": round(v, 2) for k, v in summary.pass_at_k.items()}}))
    return 1 if summary.errors else 0


async def _run(task, endpoint: OpenAIChatEndpoint, samples, scoring: Scoring, options: EvalOptions,  # noqa: ANN001
               data_sha256: str) -> Summary:
    try:
        model = await endpoint.check()
        results = None
        if options.output is not None:
            settings = RunSettings(task.name, model, options.temperature, options.max_tokens or task.max_tokens,
                                   options.repeats, options.limit, options.seed, options.extraction,
                                   options.timeout_seconds, data_sha256)
            results = ResultsFile.open(options.output, settings, options.fresh)
        try:
            return await evaluate(task, endpoint, samples, scoring=scoring, concurrency=options.concurrency,
                                  temperature=options.temperature, max_tokens=options.max_tokens, seed=options.seed,
                                  results=results)
        finally:
            if results is not None:
                results.close()
    finally:
        await endpoint.close()
