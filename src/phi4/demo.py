"""The demo checkpoint: Phi-4's exact tokenizer, template and vocabulary on a scaled-down network.

No machine here can download Phi-4's weights, so every part of phi4 runs and is tested on a checkpoint
the project writes itself, in the exact Hugging Face layout, with deterministic random weights.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from phi4.bpe_conversion import load_tiktoken_ranks, tokenizer_json
from phi4.model.compressed_tensors import QUANTIZATION_CONFIG, quantize_state

DEMO_VERSION = 1
# Phi-4's shape scaled down: same vocabulary, GQA ratio (4:1), rope theta and context.
DEMO_SHAPE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 896,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
# Larger stand-ins for benchmarks whose figures depend on how much work a token is (same vocabulary,
# tokenizer and template): `medium` makes a CPU engine the bottleneck of a server, `large` streams ~0.9 GB.
BENCHMARK_SHAPES: dict[str, dict[str, Any]] = {
    "medium": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12,
               "num_key_value_heads": 3},
    "large": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 3},
}
# Logits of random weights must be well separated, or greedy comparisons flip on rounding noise.
LM_HEAD_STD = 0.5
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def asset_path(*parts: str) -> Path:
    return Path(str(resources.files("phi4").joinpath("assets", *parts)))


def reference_config(name: str = "phi-4") -> dict[str, Any]:
    return json.loads(asset_path(name, "config.json").read_text())


def demo_config() -> dict[str, Any]:
    config = reference_config("phi-4")
    config.update(DEMO_SHAPE)
    config["_name_or_path"] = "phi4-demo"
    return config


@functools.cache
def phi4_tokenizer_json() -> str:
    """Phi-4's tokenizer.json: cl100k_base ranks plus the 96 added tokens with their exact flags."""
    ranks = load_tiktoken_ranks(asset_path("phi-4", "cl100k_base.tiktoken"))
    tokenizer_config = json.loads(asset_path("phi-4", "tokenizer_config.json").read_text())
    added = [{"id": int(i), **token} for i, token in tokenizer_config["added_tokens_decoder"].items()]
    return json.dumps(tokenizer_json(ranks, added), ensure_ascii=False)


def random_phi3_weights(
    config: dict[str, Any], seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the HF Phi3ForCausalLM layout (fused qkv_proj and gate_up_proj).

    On a GPU, a full-size Phi-4 (14B parameters) is drawn there in seconds, in `dtype`.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    qkv_rows = (heads + 2 * kv_heads) * head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype).mul_(std)

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(hidden, std=0.1)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights[prefix + "input_layernorm.weight"] = norm_weight()
        weights[prefix + "self_attn.qkv_proj.weight"] = normal(qkv_rows, hidden, std=hidden**-0.5)
        weights[prefix + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim, std=(heads * head_dim) ** -0.5)
        weights[prefix + "post_attention_layernorm.weight"] = norm_weight()
        weights[prefix + "mlp.gate_up_proj.weight"] = normal(2 * inter, hidden, std=hidden**-0.5)
        weights[prefix + "mlp.down_proj.weight"] = normal(hidden, inter, std=inter**-0.5)
    weights["model.norm.weight"] = norm_weight()
    if config.get("tie_word_embeddings"):
        weights["model.embed_tokens.weight"] *= LM_HEAD_STD
    else:
        weights["lm_head.weight"] = normal(config["vocab_size"], hidden, std=LM_HEAD_STD)
    return weights


def write_checkpoint(
    directory: Path,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    num_shards: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
) -> None:
    """Write config, Phi-4's tokenizer files and weights (one file, or shards plus an index) to `directory`.

    `fp8` writes the projections pre-quantized, in the compressed-tensors layout (model/compressed_tensors.py).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    if fp8:
        config["quantization_config"] = QUANTIZATION_CONFIG
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.json").write_text(phi4_tokenizer_json(), encoding="utf-8")
    for name in TOKENIZER_FILES:
        shutil.copyfile(asset_path("phi-4", name), directory / name)
    tensors = {name: t.to(dtype).contiguous() for name, t in weights.items()}
    if fp8:
        tensors = quantize_state(tensors)
    metadata = {"format": "pt"}
    if num_shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
        return
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for shard in range(num_shards):
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        shard_names = names[shard::num_shards]
        save_file({n: tensors[n] for n in shard_names}, str(directory / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard_names, filename))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_demo_checkpoint(directory: Path, num_shards: int = 1, fp8: bool = False) -> Path:
    config = demo_config()
    write_checkpoint(directory, config, random_phi3_weights(config), num_shards=num_shards, fp8=fp8)
    return directory


def shaped_config(shape: str) -> dict[str, Any]:
    """The demo's config with one of BENCHMARK_SHAPES (or the demo's own, "demo")."""
    return {**demo_config(), **BENCHMARK_SHAPES.get(shape, {}), "_name_or_path": f"phi4-{shape}"}


def write_shaped_checkpoint(directory: Path, shape: str) -> Path:
    config = shaped_config(shape)
    write_checkpoint(directory, config, random_phi3_weights(config))
    return directory


def cache_dir() -> Path:
    if os.environ.get("PHI4_CACHE"):
        return Path(os.environ["PHI4_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "phi4"


def demo_checkpoint_path() -> Path:
    """The demo checkpoint in the cache, built on first use (atomically, so concurrent builders agree)."""
    target = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo_checkpoint(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
