"""The offline command-line tools: `phi4 generate` and `phi4 bench`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phi4.cli import main


def test_generate_prints_the_completion_as_json(demo_dir, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["generate", "Hello", "--max-tokens", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) == 5 and result["finish_reason"] == "length" and isinstance(result["text"], str)
    assert main(["generate", "Hello", "--chat", "--max-tokens", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] != result["token_ids"]


def test_bench_prints_one_json_line_per_batch_size(demo_dir, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--prompt-len", "16", "--output-len", "6", "--num-seqs", "1", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["num_seqs"] for line in lines] == [1, 3]
    for line in lines:
        assert line["generated_tokens"] == 6 * line["num_seqs"]
        assert line["prefill_tok_s"] > 0 and line["decode_tok_s_total"] > 0 and line["ttft_ms_max"] > 0
        assert line["decode_tok_s_per_seq"] == pytest.approx(line["decode_tok_s_total"] / line["num_seqs"], rel=0.01)
        assert line["peak_memory_bytes"] > 0 and line["batch_invariant"] is True


def test_the_gpu_benchmark_runs_end_to_end_on_the_demo_shape(tmp_path: Path) -> None:
    """benchmarks/gpu_bench.py is run by hand on a lent GPU; on CPU at toy sizes it must still work."""
    output = tmp_path / "bench.json"
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_bench.py"
    subprocess.run([sys.executable, str(script), "--shape", "demo", "--device", "cpu", "--prompt-len", "24",
                    "--new-tokens", "6", "--batch", "3", "--hf-batch", "2", "--prefill-len", "40",
                    "--greedy-tokens", "6", "--logit-prompts", "2", "--output", str(output)],
                   check=True, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert not [f for f in lines if "error" in f]
    figures = {f["figure"]: f for f in lines}
    assert figures["greedy_vs_reference"]["equal"], figures["greedy_vs_reference"]
    assert figures["summary"]["phi4_bf16_batch1_tok_s"] > 0
    assert {"hf_decode", "phi4", "phi4_prefill", "phi4_fp8", "fp8_logit_error"} <= set(figures)
