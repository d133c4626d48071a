"""fp8 weights (`--quantization fp8`): float8_e4m3 with one scale per output channel, activations
quantized per token at run time. On CUDA the products run on `torch._scaled_mm` (Hopper) or, with batch
invariance on, on the Triton matmul of triton_ops (same arithmetic, tiles fixed); on CPU on phi4's kernel,
which reads the float8 bytes as they are (model/cpu_kernels.c).

Reading half the bytes of bf16 is what lifts the batch-1 decode ceiling. The LM head stays in the model's
dtype, as vLLM does: it decides every token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


@dataclass(frozen=True)
class Fp8Weight:
    """A [out, in] weight as float8 values and float32 per-output-channel scales: w ~= values * scale."""

    values: torch.Tensor  # [out, in] float8_e4m3fn
    scale: torch.Tensor  # [out] float32

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Weight:
        weight = weight.float()
        scale = (weight.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        return cls((weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * self.scale[:, None]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) scales: each row's largest magnitude maps to the largest float8 value."""
    x = x.float()
    scale = (x.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def _triton_ops() -> ModuleType:
    """phi4's Triton kernels, imported on first use (Triton is there only with CUDA), then from this cache:
    an import statement in a function costs microseconds on every call, here once per layer and step."""
    from phi4.model import triton_ops

    return triton_ops


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, batch_invariant: bool) -> torch.Tensor:
    """On CUDA: the Triton matmul when batch-invariant, else cuBLASLt through `_scaled_mm`."""
    values, scale = quantize_activations(x)
    if batch_invariant:  # cuBLASLt picks its kernel by row count; Triton's tiles do not move
        return _triton_ops().matmul(values, weight.values, x.dtype, scale, weight.scale)
    rows = x.shape[0]
    padding = -rows % 16  # cuBLASLt's fp8 kernels want every dimension a multiple of 16
    if padding:
        values = torch.cat((values, values.new_zeros(padding, values.shape[1])))
        scale = torch.cat((scale, scale.new_ones(padding)))
    out = torch._scaled_mm(values, weight.values.t(), scale_a=scale[:, None], scale_b=weight.scale[None, :],
                           out_dtype=x.dtype)
    return out[:rows]
