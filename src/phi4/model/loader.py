"""Find a checkpoint (demo, local directory or Hub id) and load its safetensors weights. Never pickle."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from phi4.config import ModelConfig, read_json
from phi4.errors import CheckpointError, ModelNotFoundError
from phi4.model.compressed_tensors import QUANTIZED_SUFFIXES, attach_fp8_weights, is_fp8_checkpoint
from phi4.model.fp8 import FP8
from phi4.model.phi3 import Phi3ForCausalLM

CPU_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.model"]


def resolve_checkpoint(model: str) -> Path:
    """`demo`, a local HF-format directory, or a Hub id (downloaded through huggingface_hub)."""
    if model == "demo":
        from phi4.demo import demo_checkpoint_path

        return demo_checkpoint_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{model} is a file; pass the checkpoint directory that holds config.json")
    if not HUB_ID.match(model):
        raise ModelNotFoundError(f"{model!r} is neither an existing directory, 'demo', nor a Hub id like org/name")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not in the local Hub cache: try the network below
    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_PATTERNS, etag_timeout=10))
    except Exception as exc:
        raise ModelNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Without network access, download the checkpoint elsewhere and pass its local directory "
            "(the folder with config.json, tokenizer.json and *.safetensors) as the model, "
            "or use --model demo for the built-in demo checkpoint."
        ) from exc


def weight_files(directory: Path) -> list[Path]:
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map")
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names shards that are missing: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(f"{directory} has only pickle weights (*.bin/*.pt); phi4 loads safetensors only")
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def load_model(
    directory: Path, device: torch.device, dtype: torch.dtype, batch_invariant: bool = True,
    quantization: str | None = None, attention_backend: str = "auto",
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Phi3ForCausalLM:
    """The model in `directory`; `weights`, when given, replace its safetensors files (same names and shapes).

    Tensors already on `device` in `dtype` are used as they are, not copied: a benchmark can build a
    full-size model once on the GPU and hand the same memory to transformers and to phi4.
    """
    raw_config = read_json(directory / "config.json")
    config = ModelConfig.from_dict(raw_config, str(directory / "config.json"))
    prequantized = is_fp8_checkpoint(raw_config)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loaded: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}

    def take(source: str, name: str, tensor: torch.Tensor) -> None:
        if prequantized and name.endswith(".weight_scale"):
            scales[name] = tensor
            return
        if name not in expected:
            return  # e.g. a tied checkpoint that stores lm_head.weight anyway, or static input scales
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{source}: {name} has shape {list(tensor.shape)}, config.json implies {list(expected[name])}"
            )
        keep_fp8 = tensor.dtype == FP8  # float8 values stay float8, scaled by their weight_scale
        if keep_fp8 and not (prequantized and name.endswith(QUANTIZED_SUFFIXES)):
            raise CheckpointError(f"{source}: {name} is float8; phi4 keeps only the attention and MLP projections "
                                  "in fp8, from a checkpoint whose config.json has a compressed-tensors "
                                  "quantization_config")
        # On CPU, weights stay in their stored precision: phi4's kernels widen them as they read them.
        keep = keep_fp8 or (device.type == "cpu" and tensor.dtype in CPU_WEIGHT_DTYPES)
        loaded[name] = tensor.to(device=device) if keep else tensor.to(device=device, dtype=dtype)

    if weights is not None:
        for name, tensor in weights.items():
            take("weights", name, tensor)
    else:
        for path in weight_files(directory):
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        take(path.name, name, handle.get_tensor(name))
            except (SafetensorError, OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    missing = sorted(set(expected) - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: weights missing from the checkpoint: {shown}")
    model.load_state_dict(loaded, assign=True, strict=True)
    if prequantized:
        attach_fp8_weights(model, scales)
        quantization = "fp8"  # the checkpoint's own float8 weights; the rest is quantized the same way
    model.prepare(batch_invariant, quantization, attention_backend)
    return model.eval()
