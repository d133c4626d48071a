"""phi4's CPU kernels (cpu_kernels.c): built for this CPU on first use, called through ctypes.

Every kernel computes each output element by one fixed sequence of float32 operations that depends on
that element's inputs alone, so a token's bits never depend on the batch, on how its prompt was chunked or
on the instruction set, and nothing rests on what a BLAS library happens to do on one machine. Weights are
packed at load into 64-column blocks in their stored precision and widened in registers (exact).

The library is compiled with the system's C compiler (`$CC`, else `cc`) for the CPU at hand
(`-march=native`, plus `$PHI4_KERNEL_FLAGS`) into `$PHI4_CACHE/kernels`, keyed by the source, the compiler, the
flags and the CPU, and linked against the OpenMP runtime that torch has already loaded, so both share one pool
of threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from phi4.errors import Phi4Error

BLOCK_COLS = 64
FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}
BUILD_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")


class KernelBuildError(Phi4Error, RuntimeError):
    """The CPU kernels could not be compiled (no C compiler, or it failed)."""


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_library(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile cpu_kernels.c for this CPU (once: the result is cached) and return the shared library."""
    from phi4.demo import cache_dir

    source = Path(str(resources.files("phi4.model").joinpath("cpu_kernels.c")))
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"phi4's CPU kernels need a C compiler and {compiler!r} cannot be run ({exc}); "
                               "install one (e.g. apt install gcc) or set CC") from exc
    flags = (*BUILD_FLAGS, *extra_flags)
    key = hashlib.sha256("\0".join([source.read_text(), version, _cpu_signature(), *flags]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"phi4_cpu-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, "-o", staging, str(source), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling phi4's CPU kernels failed:\n{result.stderr[-4000:]}")
        os.replace(staging, target)  # atomic: concurrent builders agree
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "phi4_linear": [_P, _I, _I, _I, _P, ctypes.c_int, _I, _P, _P, _P, _I, ctypes.c_int],
    "phi4_add_rms_norm": [_P, _P, _P, ctypes.c_float, _I, _I, _P, _P, ctypes.c_int],
    "phi4_silu_and_mul": [_P, _I, _I, _P, ctypes.c_int],
    "phi4_rotary_and_cache": [_P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int],
    "phi4_argmax": [_P, _I, _I, _I, _P, ctypes.c_int],
    "phi4_attention": [_P, _I, _P, _P, _P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_int],
    "phi4_decoder": [_P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _I, ctypes.c_int],
}


def load_library(path: Path) -> ctypes.CDLL:
    import torch  # noqa: F401  (torch's OpenMP runtime must be loaded first, so the kernels share it)

    library = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = None
    library.phi4_isa.restype = ctypes.c_char_p
    library.phi4_decoder.restype = ctypes.c_int
    return library


@functools.cache
def kernels() -> ctypes.CDLL:
    """The library for this CPU, built with `$PHI4_KERNEL_FLAGS` added to the compiler's flags (space-separated:
    e.g. `-mno-avx512f` runs the AVX2 build that a CPU without AVX-512 gets, with the same bits)."""
    return load_library(build_library(tuple(os.environ.get("PHI4_KERNEL_FLAGS", "").split())))


def _threads() -> int:
    return torch.get_num_threads()


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor that Linux backs with 2 MB pages where it can (madvise, then first touch).

    A decode step streams every weight once; on 4 KB pages that is a TLB miss every 4 KB, which costs
    about 3% of a bandwidth-bound step (measured on a 0.9 GB model). Elsewhere, or for small tensors, this
    is a plain torch.empty. The slack to the next 2 MB boundary is never touched, so it is never resident.
    """
    size = torch.Size(shape).numel() * dtype.itemsize
    libc = _libc() if platform.system() == "Linux" else None
    if libc is None or size < 2 * HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    aligned = raw[offset : offset + size]
    libc.madvise(ctypes.c_void_p(aligned.data_ptr()), ctypes.c_size_t(size // HUGE_PAGE * HUGE_PAGE), MADV_HUGEPAGE)
    return aligned.view(dtype).view(shape)


def _bf16_positions() -> torch.Tensor:
    """Where each of a block's 64 columns lies in a packed bfloat16 row: in each half of 32 columns, 32-bit word i
    holds column i in its low half and column 16 + i in its high half, so that the kernels widen 16 columns with
    one shift or one mask (cpu_kernels.c, v_load_bf16_pair)."""
    column = torch.arange(BLOCK_COLS)
    return 32 * (column // 32) + 2 * (column % 16) + (column % 32) // 16


BF16_POSITIONS = _bf16_positions()


@dataclass(frozen=True)
class PackedWeight:
    """A [out, in] weight packed for the kernels: blocks of 64 output columns, [ceil(out/64), in, 64], in
    the stored precision (float8 as raw bytes, with per-output scales), zero-padded past the last column;
    bfloat16 columns in BF16_POSITIONS' order within a block."""

    blocks: torch.Tensor
    out_features: int
    in_features: int
    format: int
    scale: torch.Tensor | None = None  # float32 per output column, padded to the blocks: float8 only

    @classmethod
    def pack(cls, weight: torch.Tensor, scale: torch.Tensor | None = None) -> PackedWeight:
        if weight.dtype not in FORMATS:
            raise ValueError(f"no CPU kernel reads {weight.dtype} weights")
        out_features, in_features = weight.shape
        padded = -(-out_features // BLOCK_COLS) * BLOCK_COLS
        raw = weight.view(torch.uint8) if weight.dtype == torch.float8_e4m3fn else weight
        if padded != out_features:
            raw = torch.cat((raw, raw.new_zeros(padded - out_features, in_features)))
        tiles = raw.view(padded // BLOCK_COLS, BLOCK_COLS, in_features).transpose(1, 2)
        if weight.dtype == torch.bfloat16:
            tiles = tiles[:, :, torch.argsort(BF16_POSITIONS)]  # position p holds the column placed there
        blocks = empty_on_huge_pages(tuple(tiles.shape), tiles.dtype).copy_(tiles)
        if scale is not None:
            scale = torch.cat((scale.float(), scale.new_zeros(padded - out_features, dtype=torch.float32)))
        return cls(blocks, out_features, in_features, FORMATS[weight.dtype], scale)

    @property
    def dtype(self) -> torch.dtype:
        """The stored precision the kernel reads."""
        return next(dtype for dtype, code in FORMATS.items() if code == self.format)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the unpacked weight (an embedding lookup in a tied LM head), widened to float32."""
        columns = ids % BLOCK_COLS
        if self.format == FORMATS[torch.bfloat16]:
            columns = BF16_POSITIONS[columns]
        rows = self.blocks[ids // BLOCK_COLS, :, columns]
        return rows.view(torch.float8_e4m3fn).float() if self.format == 3 else rows.float()


def linear(x: torch.Tensor, weight: PackedWeight, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] (float32, rows contiguous) @ weight.T -> [M, out]; float8 weights take per-row x_scale."""
    assert x.dtype == torch.float32 and x.stride(-1) == 1 and x.shape[-1] == weight.in_features
    out = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    kernels().phi4_linear(
        x.data_ptr(), x.shape[0], weight.in_features, x.stride(0), weight.blocks.data_ptr(), weight.format,
        weight.out_features, None if x_scale is None else x_scale.data_ptr(),
        None if weight.scale is None else weight.scale.data_ptr(), out.data_ptr(), out.stride(0), _threads(),
    )
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual), rows of float32 [T, hidden]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is None else residual  # the residual stream is updated in place
    kernels().phi4_add_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                                eps, x.shape[0], x.shape[1], out.data_ptr(), summed.data_ptr(), _threads())
    return out, summed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=torch.float32)
    kernels().phi4_silu_and_mul(gate_up.contiguous().data_ptr(), rows, width, out.data_ptr(), _threads())
    return out


def rotary_and_cache(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, rotary_dim: int,
                     cos: torch.Tensor, sin: torch.Tensor, rope_rows: torch.Tensor, slots: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Rotate q and k of qkv [T, (heads + 2 kv_heads) * head_dim] in place; write k and v to their slots."""
    assert qkv.stride(-1) == 1 and rope_rows.dtype == slots.dtype == torch.int64
    kernels().phi4_rotary_and_cache(
        qkv.data_ptr(), qkv.shape[0], qkv.stride(0), heads, kv_heads, head_dim, rotary_dim, cos.data_ptr(),
        sin.data_ptr(), rope_rows.data_ptr(), slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _threads(),
    )


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token [B] (int64), ties to the lowest id: torch's argmax is ~10x slower on CPU."""
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    kernels().phi4_argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(),
                          _threads())
    return out


@dataclass(frozen=True)
class AttentionPlan:
    """One step's sequences for the kernel, as int32: where each one's queries start in the flat batch
    [B + 1], its context length with this step's tokens [B], and its block table padded [B, max_blocks]."""

    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, heads: int,
              kv_heads: int, head_dim: int, scale: float, block_size: int) -> torch.Tensor:
    """q [T, heads * head_dim] (rows may be strided) over the paged cache -> [T, heads * head_dim]."""
    out = torch.empty(q.shape[0], heads * head_dim, dtype=torch.float32)
    kernels().phi4_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), out.stride(0),
        plan.context_lens.shape[0], plan.query_start.data_ptr(), plan.context_lens.data_ptr(),
        plan.block_tables.data_ptr(), plan.block_tables.shape[1], block_size, heads, kv_heads, head_dim, scale,
        _threads(),
    )
    return out


class DecoderLayerStruct(ctypes.Structure):
    """cpu_kernels.c's DecoderLayer: one layer's packed weights, norms and KV cache."""

    _fields_ = [("input_norm", _P), ("post_attention_norm", _P), ("qkv", _P), ("o", _P), ("gate_up", _P),
                ("down", _P), ("qkv_format", ctypes.c_int32), ("o_format", ctypes.c_int32),
                ("gate_up_format", ctypes.c_int32), ("down_format", ctypes.c_int32), ("k_cache", _P),
                ("v_cache", _P)]


class DecoderShapeStruct(ctypes.Structure):
    _fields_ = [("layers", _I), ("hidden", _I), ("intermediate", _I), ("heads", _I), ("kv_heads", _I),
                ("head_dim", _I), ("rotary_dim", _I), ("block_size", _I), ("eps", ctypes.c_float),
                ("attention_scale", ctypes.c_float)]


@dataclass(frozen=True)
class LayerWeights:
    """What one decoder layer hands the fused kernel; the tensors must outlive every call."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: PackedWeight
    o: PackedWeight
    gate_up: PackedWeight
    down: PackedWeight


class DecoderStack:
    """Every decoder layer in one call of phi4_decoder: the same kernels on the same operands as calling them
    one by one, so the same bits, without the Python and ctypes cost of nine calls per layer. Weights in float8
    are not taken (their activations are quantized per token between the kernels)."""

    def __init__(self, layers: list[LayerWeights], final_norm: torch.Tensor, *, intermediate: int, heads: int,
                 kv_heads: int, head_dim: int, rotary_dim: int, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
        if any(w.scale is not None for layer in layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)):
            raise ValueError("the fused decoder takes no float8 weights")
        self._layers = layers  # keeps every pointer below alive
        self._final_norm, self._cos, self._sin = final_norm, cos, sin
        self.hidden = final_norm.shape[0]
        self._shape = DecoderShapeStruct(len(layers), self.hidden, intermediate, heads, kv_heads, head_dim,
                                         rotary_dim, 0, eps, head_dim**-0.5)
        self._structs = (DecoderLayerStruct * len(layers))(*[DecoderLayerStruct(
            layer.input_norm.data_ptr(), layer.post_attention_norm.data_ptr(), layer.qkv.blocks.data_ptr(),
            layer.o.blocks.data_ptr(), layer.gate_up.blocks.data_ptr(), layer.down.blocks.data_ptr(),
            layer.qkv.format, layer.o.format, layer.gate_up.format, layer.down.format, None, None)
            for layer in layers])
        self._cache_base = 0

    def forward(self, hidden: torch.Tensor, rope_rows: torch.Tensor, slots: torch.Tensor, kv_caches: torch.Tensor,
                plan: AttentionPlan, block_size: int) -> torch.Tensor:
        """hidden [T, hidden]: the embeddings, replaced by the final normalised states (and returned)."""
        assert hidden.dtype == torch.float32 and hidden.is_contiguous() and hidden.shape[1] == self.hidden
        assert rope_rows.dtype == slots.dtype == torch.int64 and kv_caches.is_contiguous()
        assert kv_caches.shape[0] == len(self._layers) and kv_caches.dtype == torch.float32
        self._shape.block_size = block_size
        if kv_caches.data_ptr() != self._cache_base:  # the runner allocates its cache once: set it once
            layer_stride, half = kv_caches.stride(0) * 4, kv_caches.stride(1) * 4  # bytes
            self._cache_base = base = kv_caches.data_ptr()
            for index, struct in enumerate(self._structs):
                struct.k_cache = base + index * layer_stride
                struct.v_cache = base + index * layer_stride + half
        status = kernels().phi4_decoder(
            hidden.data_ptr(), hidden.shape[0], ctypes.byref(self._shape), self._structs, self._final_norm.data_ptr(),
            self._cos.data_ptr(), self._sin.data_ptr(), rope_rows.data_ptr(), slots.data_ptr(),
            plan.context_lens.shape[0], plan.query_start.data_ptr(), plan.context_lens.data_ptr(),
            plan.block_tables.data_ptr(), plan.block_tables.shape[1], _threads(),
        )
        if status != 0:
            raise MemoryError(f"no memory for the activations of a {hidden.shape[0]}-token step")
        return hidden
