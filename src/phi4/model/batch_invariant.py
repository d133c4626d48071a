"""Matrix products on MKL whose every row is computed the same way whatever else is in the batch.

A BLAS picks its kernel, and so the order in which it sums, from the shape of the problem: on CPU, MKL
computes a row of a 1-row product differently from the same row in a 16-row one. A request's numbers
would then depend on the batch it happens to share, and "same seed, same output" would not hold under
load. In float32 phi4 sidesteps MKL with its own row-wise kernel (cpu_kernels.py); this module serves
the products that stay on MKL: the tiled attention's, the fp8 ones, and the layers in bfloat16 or float16
on CPU. Two rules keep every row's arithmetic fixed:

- Row counts are padded into one equivalence class. MKL's sgemm gives bitwise the same row for every row
  count in {4, 8} and from 12 up (measured for every matmul shape of the model; tests/test_batch_invariance
  checks it), so a product over m rows runs on `invariant_rows(m)` rows, the extra rows zero.
- The LM head runs in chunks of exactly 4 rows as W @ x^T, the fastest kernel at small batch that is
  also independent of a row's position and neighbours.

Row-wise operations (norms, softmax, rotary, elementwise) are already independent of other rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LM_HEAD_CHUNK = 4


def invariant_rows(m: int) -> int:
    """The smallest row count >= m in the class {4, 8} and [12, inf)."""
    if m <= 4:
        return 4
    if m <= 8:
        return 8
    return max(m, 12)


def pad_rows(x: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    missing = rows - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    m = x.shape[0]
    return F.linear(pad_rows(x, invariant_rows(m)), weight)[:m]


def lm_head(x: torch.Tensor, weight_out_major: torch.Tensor) -> torch.Tensor:
    """Logits [m, vocab] from hidden states [m, hidden] and the head stored [vocab, hidden] contiguous."""
    m = x.shape[0]
    padded = pad_rows(x, -(-m // LM_HEAD_CHUNK) * LM_HEAD_CHUNK)
    chunks = [torch.mm(weight_out_major, chunk.t()) for chunk in padded.split(LM_HEAD_CHUNK)]
    return torch.cat(chunks, dim=1).t()[:m]
