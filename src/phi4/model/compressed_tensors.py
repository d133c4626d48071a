"""Pre-quantized fp8 checkpoints in the compressed-tensors layout (as published for Phi-4 by llm-compressor).

Each quantized Linear stores `<name>.weight` as float8_e4m3fn [out, in] and `<name>.weight_scale`, one
scale per output channel ([out, 1]) or one for the whole tensor ([1]); config.json's `quantization_config`
says so. phi4 reads the float8 values as they are (no bf16 copy is ever made) and quantizes activations
per token at run time, as it does for `--quantization fp8`. A checkpoint with static activation scales
(`<name>.input_scale`) also loads; phi4 then still uses per-token scales, which are at least as precise.
"""

from __future__ import annotations

from typing import Any

import torch

from phi4.errors import CheckpointError
from phi4.model.fp8 import FP8, Fp8Weight

# The projections phi4 keeps in fp8; embeddings, norms and the LM head stay in the model's dtype.
QUANTIZED_SUFFIXES = (".self_attn.qkv_proj.weight", ".self_attn.o_proj.weight", ".mlp.gate_up_proj.weight",
                      ".mlp.down_proj.weight")

QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True},
        }
    },
}


def is_fp8_checkpoint(raw_config: dict[str, Any]) -> bool:
    """True for a compressed-tensors fp8 checkpoint; False without a quantization_config; else an error."""
    quantization = raw_config.get("quantization_config")
    if quantization is None:
        return False
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method != "compressed-tensors":
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported; phi4 loads "
                              "compressed-tensors fp8 checkpoints, or quantizes bf16 ones with --quantization fp8")
    for name, group in (quantization.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        scheme = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        if scheme not in (("float", 8, "channel"), ("float", 8, "tensor")):
            raise CheckpointError(f"quantization_config group {name}: weights {scheme} are not supported; phi4 "
                                  "loads float 8-bit weights with per-channel or per-tensor scales")
    return True


def attach_fp8_weights(model: torch.nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Turn every loaded float8 weight into an Fp8Weight with its scale; the module's `weight` is emptied."""
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != FP8:
            continue
        scale = scales.pop(f"{module_name}.weight_scale", None)
        if scale is None:
            raise CheckpointError(f"{module_name}.weight is float8 but has no {module_name}.weight_scale")
        values = weight.detach()
        scale = scale.to(device=values.device, dtype=torch.float32).flatten()
        if scale.numel() == 1:
            scale = scale.expand(values.shape[0]).contiguous()
        if scale.numel() != values.shape[0]:
            raise CheckpointError(f"{module_name}.weight_scale has {scale.numel()} values for {values.shape[0]} rows")
        module.fp8 = Fp8Weight(values, scale)
        module.weight = torch.nn.Parameter(values.new_empty(0), requires_grad=False)
    if scales:
        raise CheckpointError(f"scales for weights that are not float8: {', '.join(sorted(scales)[:5])}")


def quantize_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the compressed-tensors fp8 layout: the projections as float8 plus their scales."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.endswith(QUANTIZED_SUFFIXES):
            packed = Fp8Weight.quantize(tensor)
            out[name] = packed.values
            out[name + "_scale"] = packed.scale[:, None]
        else:
            out[name] = tensor
    return out
