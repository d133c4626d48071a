"""x @ W.T on CPU with one fixed-order dot product per output element (compiled by numba).

Why not MKL: a BLAS picks its kernel, and with it the order of every sum, from the problem's shape, so a
token's row comes out differently alone and in a batch of 16. This kernel computes each output element
as the dot product of a row of x and a row of W, vectorised along K by LLVM in an order that depends on
K alone; the loop over rows and the split of columns across threads never touch that order, and neither
does where a row sits in memory (tested). Every row is therefore bitwise the same whatever shares its
batch: batch invariance by construction, with no padding.

It is also fast where decode lives: reading each weight row once from memory for every token of the
step, it beats MKL up to about 16 rows (demo LM head 100352 x 256: 3.6 ms at 1 row against MKL's 5.1,
14 ms at 16 against 18; see benchmarks/batch_invariance_cost.py). Beyond, MKL's blocked GEMM is up to 2x
faster, so only the batch-invariant path uses this kernel for prefill.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Up to this many rows the kernel is faster than MKL (measured on the demo and 1024-wide shapes).
FASTEST_ROWS = 16


@functools.cache
def _kernel() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """numba is imported, and the kernel compiled or read from its cache, on first use."""
    if "NUMBA_CACHE_DIR" not in os.environ:  # beside the installed package may not be writable
        from phi4.demo import cache_dir

        os.environ["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba")
    import numba

    from phi4.model._rowwise_kernel import rowwise_matmul

    # as many threads as torch uses, so that the two never oversubscribe the cores
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return rowwise_matmul


def rowwise_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T in float32, every row computed the same way whatever M is."""
    assert x.dtype == weight.dtype == torch.float32 and weight.is_contiguous(), "float32, weight [out, in]"
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    if x.shape[0]:
        _kernel()(x.numpy(), weight.numpy(), out.numpy())
    return out


def fastest_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The faster of this kernel and MKL for the row count: batch invariance not guaranteed."""
    return rowwise_matmul(x, weight) if x.shape[0] <= FASTEST_ROWS else F.linear(x, weight)
