"""Model configuration (parsed from a checkpoint's config.json) and engine configuration."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM",)


@dataclass(frozen=True)
class LongRopeScaling:
    """LongRoPE: per-frequency rescaling, `short_factor` within the original context, `long_factor` beyond."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    longrope: LongRopeScaling | None
    tie_word_embeddings: bool
    torch_dtype: str
    eos_token_ids: tuple[int, ...]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        architectures = raw.get("architectures") or []
        if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures) and raw.get("model_type") != "phi3":
            raise CheckpointError(
                f"{source}: architecture {architectures or raw.get('model_type')!r} is not supported; "
                f"phi4 serves {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints (Phi-4, Phi-4-mini, Phi-3)"
            )
        try:
            hidden_size = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            max_positions = int(raw["max_position_embeddings"])
            if raw.get("hidden_act", "silu") != "silu":
                raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
            if raw.get("attention_bias") or raw.get("mlp_bias") or raw.get("lm_head_bias"):
                raise CheckpointError(f"{source}: linear biases are not supported")
            sliding_window = raw.get("sliding_window")
            if sliding_window is not None and int(sliding_window) < max_positions:
                raise CheckpointError(
                    f"{source}: sliding_window {sliding_window} < max_position_embeddings {max_positions} "
                    "is not supported"
                )
            rope = _rope_parameters(raw)
            rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
            partial = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
            head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
            eos = raw.get("eos_token_id")
            config = cls(
                hidden_size=hidden_size,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                vocab_size=int(raw["vocab_size"]),
                max_position_embeddings=max_positions,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                partial_rotary_factor=partial,
                longrope=_longrope(raw, rope, head_dim, partial, max_positions, source),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
                eos_token_ids=_int_tuple(eos),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{source}: malformed or incomplete model config ({exc!r})") from exc
        if config.num_attention_heads % config.num_key_value_heads:
            raise CheckpointError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        return config

    @classmethod
    def from_dir(cls, directory: Path) -> ModelConfig:
        return cls.from_dict(read_json(directory / "config.json"), str(directory / "config.json"))


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Older configs say `rope_scaling` (with `type`), newer ones `rope_parameters` (with `rope_type`)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError("rope_scaling must be an object or null")
    return rope


def _longrope(
    raw: dict[str, Any], rope: dict[str, Any], head_dim: int, partial: float, max_positions: int, source: str
) -> LongRopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "longrope":
        raise CheckpointError(f"{source}: rope scaling {kind!r} is not supported (default and longrope are)")
    original = int(rope.get("original_max_position_embeddings") or raw["original_max_position_embeddings"])
    short, long = tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"]))
    expected = int(head_dim * partial) // 2
    if len(short) != expected or len(long) != expected:
        raise CheckpointError(f"{source}: longrope factors must have {expected} entries (rotary_dim / 2)")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        # LongRoPE's published default: scale attention logits for the extension ratio.
        factor = rope.get("factor") or max_positions / original
        attention_factor = 1.0 if factor <= 1.0 else (1 + math.log(factor) / math.log(original)) ** 0.5
    return LongRopeScaling(short, long, original, float(attention_factor))


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class EngineConfig:
    """How the engine schedules and caches. `None` means: derive it from the model and the device."""

    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 1 << 30  # CPU default: 1 GiB of KV cache
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # Every token computed in an order independent of the batch: same seed, same output under any load.
    batch_invariant: bool = True
    quantization: str | None = None  # "fp8": float8 weights with per-channel scales (model/fp8.py)
    # "auto": Triton kernels on CUDA, phi4's kernel on CPU (both batch-invariant); "torch" forces
    # the reference backend, against which the others are tested.
    attention_backend: str = "auto"
    # Decode steps replayed from CUDA graphs (with the Triton attention); False runs every step eagerly.
    cuda_graphs: bool = True
