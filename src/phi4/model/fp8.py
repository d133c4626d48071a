"""fp8 weights (`--quantization fp8`): float8_e4m3 with one scale per output channel, activations
quantized per token at run time, products on `torch._scaled_mm` (Hopper on GPU; also on CPU in torch 2.13),
or, on CUDA with batch invariance on, on the Triton matmul of triton_ops (same arithmetic, tiles fixed).

Reading half the bytes of bf16 is what lifts the batch-1 decode ceiling on a GPU; on CPU the point is to
test the numerics. The LM head stays in the model's dtype, as vLLM does: it decides every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phi4.model.batch_invariant import invariant_rows, pad_rows

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


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, batch_invariant: bool) -> torch.Tensor:
    rows = x.shape[0]
    if x.is_cuda and batch_invariant:  # cuBLASLt picks its kernel by row count; Triton's tiles do not move
        from phi4.model import triton_ops

        values, scale = quantize_activations(x)
        return triton_ops.matmul(values, weight.values, x.dtype, scale, weight.scale)
    if x.is_cuda:  # cuBLASLt's fp8 kernels want every dimension a multiple of 16
        x = pad_rows(x, -(-rows // 16) * 16)
    elif batch_invariant:  # the same row-count classes as every other product (see batch_invariant.py)
        x = pad_rows(x, invariant_rows(rows))
    values, scale = quantize_activations(x)
    out = torch._scaled_mm(values, weight.values.t(), scale_a=scale[:, None], scale_b=weight.scale[None, :],
                           out_dtype=x.dtype)
    return out[:rows]
