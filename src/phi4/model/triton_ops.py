"""Fused GPU kernels for the model's row-wise steps, and a batch-invariant matrix product.

Each row-wise kernel handles one token per program with the whole row in one block, so a token's
arithmetic never depends on the batch. They round exactly where the reference (transformers, bf16)
rounds: the residual sum, RMSNorm's cast back before the weight, SiLU before the product, each term of
the rotation. Intermediate values stay in float32.

`matmul` computes x @ w.T with one tile configuration per weight shape (never per row count) and no
split of the reduction, so every output row is summed in the same order whatever the batch. cuBLAS
picks its kernel, and with it the summation order, from the row count.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton
import triton.language as tl

# fp8 products on Hopper accumulate in reduced precision unless promoted to float32: Triton's default for
# fp8 never promotes; promoting every 32 products is what cuBLAS does for torch._scaled_mm without fast
# accumulation, so the invariant fp8 matmul and _scaled_mm do the same arithmetic.
FP8_PROMOTE_EVERY = 32


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, hidden, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * hidden + cols, mask=valid, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)  # the reference adds in the model's dtype
        tl.store(sum_ptr + row * hidden + cols, x, mask=valid)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.math.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (weight * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=valid)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); without a residual, (RMSNorm(x), x)."""
    x = x.contiguous()
    rows, hidden = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    if rows:
        _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, summed, hidden, eps,
                                      HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
    return out, summed


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=valid, other=0.0).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (up * activated).to(out_ptr.dtype.element_ty), mask=valid)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, width)
    block = 1024
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, width, BLOCK=block)
    return out


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, rope_rows, heads, head_dim, rotary_dim,
                   HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    table_row = tl.load(rope_rows + token).to(tl.int64)
    head = tl.arange(0, BLOCK_HEADS)[:, None]
    dim = tl.arange(0, HALF)[None, :]
    valid = (head < heads) & (dim < rotary_dim // 2)
    base = token * heads * head_dim + head * head_dim
    first = tl.load(x_ptr + base + dim, mask=valid, other=0.0).to(tl.float32)
    second = tl.load(x_ptr + base + rotary_dim // 2 + dim, mask=valid, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + table_row * rotary_dim + dim, mask=dim < rotary_dim // 2, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + table_row * rotary_dim + dim, mask=dim < rotary_dim // 2, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the model's dtype like the reference
    # (the table repeats its angles in both halves, so the first half's cos/sin serve the second too)
    out_first = (first * cos).to(dtype).to(tl.float32) + (-second * sin).to(dtype).to(tl.float32)
    out_second = (second * cos).to(dtype).to(tl.float32) + (first * sin).to(dtype).to(tl.float32)
    tl.store(out_ptr + base + dim, out_first.to(dtype), mask=valid)
    tl.store(out_ptr + base + rotary_dim // 2 + dim, out_second.to(dtype), mask=valid)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_rows: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of x [T, heads, head_dim]; the rest are copied unchanged."""
    x = x.contiguous()
    tokens, heads, head_dim = x.shape
    rotary_dim = cos.shape[1]
    out = x.clone() if rotary_dim < head_dim else torch.empty_like(x)
    if tokens:
        _rotary_kernel[(tokens,)](x, out, cos, sin, rope_rows, heads, head_dim, rotary_dim,
                                  HALF=triton.next_power_of_2(rotary_dim // 2),
                                  BLOCK_HEADS=triton.next_power_of_2(heads))
    return out


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every row count
def _matmul_kernel(a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                   k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr,
                   IMPRECISE_ACC: tl.constexpr):
    # Grouped launch order: neighbouring programs share weight tiles, which then come from L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_valid = (k0 + ks) < k_end
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :], mask=(rows[:, None] < M) & k_valid[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + (k0 + ks)[:, None], mask=(cols[None, :] < N) & k_valid[:, None],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, max_num_imprecise_acc=IMPRECISE_ACC)
    if SCALED:  # fp8: a row scale per token, a column scale per output channel, as torch._scaled_mm applies them
        acc = acc * tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)[:, None]
        acc = acc * tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    # One split writes the result; several write float32 partial sums, added up in order by _sum_splits.
    out = c_ptr + split.to(tl.int64) * M * N + rows[:, None] * stride_cm + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit(do_not_specialize=["total"])
def _sum_splits_kernel(partial_ptr, out_ptr, total, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = (tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
    valid = offsets < total
    acc = tl.load(partial_ptr + offsets, mask=valid, other=0.0)
    for split in tl.static_range(1, SPLITS):
        acc += tl.load(partial_ptr + split * total + offsets, mask=valid, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=valid)


@dataclass(frozen=True)
class MatmulPlan:
    launch: Mapping[str, int]  # the kernel's tile sizes and launch options
    splits: int  # parts of the k reduction, summed in order afterwards
    k_per_split: int
    block_m: int
    tiles_n: int


@functools.cache
def matmul_plan(n: int, k: int, interpreted: bool) -> MatmulPlan:
    """The tiles for a weight [n, k]: a function of the weight alone, never of the row count; worked out
    once per weight shape, not per call.

    A decode step reads the weights once, so its speed is memory bandwidth times the share of the GPU it
    keeps busy: narrow outputs get narrow tiles, and a narrow output with a long reduction (Phi-4's o_proj and
    down_proj, 5120 columns) is also split along k into a fixed number of parts, summed in a fixed order.
    """
    block_m, block_k = 64, 64
    block_n = 32 if n <= 8192 else 64 if n <= 32768 else 128
    splits = 4 if n <= 8192 and k >= 4096 else 1
    launch = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    if not interpreted:  # Triton's interpreter has no pipeline depth or warps
        launch |= {"num_warps": 4, "num_stages": 4}
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return MatmulPlan(MappingProxyType(launch), splits, k_per_split, block_m, triton.cdiv(n, block_n))


def matmul(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None,
           x_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T, each row computed the same way whatever M is.

    With float8 operands, `x_scale` [M] and `weight_scale` [N] (float32) scale rows and columns of the
    float32 product, like torch._scaled_mm.
    """
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    assert weight.stride(1) == 1, "the weight must be stored [out, in] with contiguous rows"
    out = x.new_empty(m, n, dtype=out_dtype or x.dtype)
    if m == 0:
        return out
    plan = matmul_plan(n, k, x.device.type == "cpu")
    splits = plan.splits
    target = out if splits == 1 else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, plan.block_m) * plan.tiles_n, splits)
    scaled = x_scale is not None
    if scaled:
        assert weight_scale is not None and out_dtype is not None, "fp8 products need both scales and an out_dtype"
    _matmul_kernel[grid](x, weight, target, x_scale if scaled else x, weight_scale if scaled else weight, m, n, k,
                         x.stride(0), weight.stride(0), n, plan.k_per_split,
                         PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SCALED=scaled,
                         IMPRECISE_ACC=FP8_PROMOTE_EVERY if scaled else 0, **plan.launch)
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, out, m * n, SPLITS=splits, BLOCK=block)
    return out
