"""What grammars cost: microseconds per token spent computing masks (mean, p99) over the 100k vocabulary,
and decode tokens/s of 16 concurrent sequences with and without a JSON-schema constraint, same run.

Usage: python benchmarks/structured_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from phi4 import LLM, SamplingParams
from phi4.structured.grammars import json_schema_grammar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from structured_corpus import SCHEMAS  # noqa: E402


def mask_microseconds(llm: LLM, samples_per_schema: int = 3) -> list[float]:
    """Time each mask computation while replaying generated outputs through fresh matchers."""
    grammars = llm.engine.grammars
    words = (llm.engine.model_config.vocab_size + 31) // 32
    row = torch.empty(words, dtype=torch.int32)
    timings = []
    for name, schema in SCHEMAS.items():
        grammar = json_schema_grammar(schema)
        outputs = llm.generate([f"{name}"] * samples_per_schema,
                               [SamplingParams(temperature=1.0, seed=s, max_tokens=96, grammar=grammar)
                                for s in range(samples_per_schema)])
        for output in outputs:
            constraint = grammars.constraint(grammars.compile(grammar))
            for token in output.token_ids:
                start = time.perf_counter()
                constraint.fill(row)
                timings.append(1e6 * (time.perf_counter() - start))
                if constraint.finished:
                    break
                constraint.consume(token)
    return timings


def decode_tokens_per_second(llm: LLM, grammar: str | None, sequences: int = 16, new_tokens: int = 64) -> float:
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=new_tokens, grammar=grammar,
                             ignore_eos=grammar is None) for s in range(sequences)]
    prompts = [f"Request {s}: answer as JSON." for s in range(sequences)]
    first: dict[str, float] = {}
    generated = 0
    for output in llm.stream(prompts, params):
        first.setdefault(output.request_id, time.perf_counter())
        generated += len(output.new_token_ids)
    return (generated - sequences) / (time.perf_counter() - max(first.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM("demo", enable_prefix_caching=False)
    timings = mask_microseconds(llm)
    ordered = sorted(timings)
    print(json.dumps({"figure": "mask_us_per_token", "vocab": llm.engine.model_config.vocab_size,
                      "schemas": len(SCHEMAS), "masks": len(timings), "mean": round(statistics.fmean(timings), 1),
                      "p50": round(ordered[len(ordered) // 2], 1), "p99": round(ordered[int(0.99 * len(ordered))], 1)}))
    # A schema whose answers run long, so both runs decode 64 tokens per sequence for most of the way.
    grammar = json_schema_grammar({"type": "object", "properties": {"story": {"type": "string"}},
                                   "required": ["story"]})
    decode_tokens_per_second(llm, None, 2, 4)  # warm-up
    rates: dict[str, list[float]] = {"constrained": [], "free": []}
    for _ in range(args.repeats):
        rates["free"].append(decode_tokens_per_second(llm, None))
        rates["constrained"].append(decode_tokens_per_second(llm, grammar))
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    print(json.dumps({"figure": "decode_tok_s_16_sequences", "free": round(free, 1),
                      "constrained": round(constrained, 1), "ratio": round(constrained / free, 3)}))


if __name__ == "__main__":
    main()
