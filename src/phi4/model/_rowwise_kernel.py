"""The compiled kernel behind cpu_kernels.rowwise_matmul. Imported only through cpu_kernels, which first
points numba's on-disk cache somewhere writable."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


# reassoc lets LLVM vectorise the sum along k, in an order that depends on K alone; no nnan/ninf, so
# infinities and NaNs propagate as they should.
@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)
def rowwise_matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    rows, depth = x.shape
    for n in prange(w.shape[0]):  # columns across threads: never changes an element's sum
        weight_row = w[n]
        for m in range(rows):
            x_row = x[m]
            acc = np.float32(0.0)
            for k in range(depth):
                acc += x_row[k] * weight_row[k]
            out[m, n] = acc
