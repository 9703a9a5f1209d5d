"""Our own CPU matrix-vector kernels for decode (gemv.cpp), compiled on first use.

Why our own: batch-1 decode is bound by how fast the matrix-vector products stream the weights.
PyTorch's CPU paths leave bandwidth unused at M = 1: MKL's gemv over [out, in] fp32 weights reads
~16 GB/s here, oneDNN over packed weights ~25 GB/s, dynamic int8 (fbgemm) spends more time
quantizing activations than reading weights, and the int4 tinygemm kernel reads ~9 GB/s.
gemv.cpp streams four rows at a time per thread, expands int8/int4 codes in registers and
multiplies them with int16-rounded activations (AVX512-VNNI's vpdpwssd, or AVX2's vpmaddwd on CPUs
without AVX-512 such as AMD Zen 2/3; the integer sums are exact either way). For many rows
(prefill) ``QuantizedRows.matmul`` rebuilds the weight a panel at a time in C and hands it to the
GEMM library (bf16 on CPUs with AMX/AVX512-BF16, else fp32): activations are never quantized per
tensor, so outlier channels cost nothing. Measured numbers: docs/benchmarks.md,
docs/quantization.md. kernels/decode.py runs a whole decode step in one call.

The library is built with the system C++ compiler (``g++ -O3 -march=native -fopenmp``) into
``$QWEN_CACHE_DIR`` (default ``~/.cache/qwen``)/kernels/<hash>/, once per source, compiler and CPU,
written to a temporary file and renamed so concurrent builds cannot leave a broken library. It links
to the OpenMP runtime PyTorch already loaded (same soname), so the two share one thread pool.
Without a compiler, or with ``QWEN_KERNELS=0``, ``available()`` is False and callers keep
PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

_SOURCE = Path(__file__).with_name("gemv.cpp")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
MAX_ROWS = 4  # activation rows (tokens) the kernels are meant for; beyond, GEMM libraries win
# Prefill rebuilds at most this many weight elements at once (16M: 32 MB of bf16): whole layers up
# to Qwen-7B's MLP, so the GEMM runs once per layer (panels of a layer are ~25% slower, measured).
PANEL_ELEMENTS = 1 << 24


def _cache_dir() -> Path:
    from ..hub import cache_dir

    return cache_dir() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(cxx: str) -> Path:
    source = _SOURCE.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + " ".join([cxx, *flags, version, _cpu_flags()]).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "libqwen_gemv.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {_SOURCE.name}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qwen_gemv_f32.argtypes = [p, p, p, p, i64, i64, i64, c_int]
    lib.qwen_gemv_f32.restype = None
    for name in ("qwen_gemv_q8", "qwen_gemv_q4"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, c_int]
        fn.restype = None
    lib.qwen_kernels_simd.restype = c_int
    lib.qwen_quantize_activations.argtypes = [p, i64, i64, i64, p, p, p]
    lib.qwen_quantize_activations.restype = None
    lib.qwen_dequantize_rows.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, p, c_int, c_int]
    lib.qwen_dequantize_rows.restype = None
    f32 = ctypes.c_float
    lib.qwen_decode_layers.argtypes = [p, p, p, i64, p, i64, i64, i64, i64, p, p, i64, p, p, f32, f32, c_int]
    lib.qwen_decode_layers.restype = None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first call; None when unavailable (reason: ``why_unavailable``)."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        if os.environ.get("QWEN_KERNELS", "1") == "0":
            _failed = "disabled by QWEN_KERNELS=0"
            return None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _failed = f"only built for x86-64 (this is {platform.machine()})"
            return None
        cxx = _compiler()
        if cxx is None:
            _failed = "no C++ compiler found (install g++ or set CXX)"
            return None
        try:
            lib = ctypes.CDLL(str(_build(cxx)))
            _declare(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _failed = str(exc)
            warnings.warn(f"qwen CPU kernels unavailable, using PyTorch's: {exc}", stacklevel=2)
            return None
        if lib.qwen_kernels_simd() < 256:
            _failed = "this CPU has neither AVX-512 nor AVX2+FMA: the portable build is slower than PyTorch's kernels"
            return None
        _lib = lib
    return _lib


@functools.lru_cache(maxsize=1)
def _native_bf16() -> bool:
    flags = _cpu_flags().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def prefill_dtype() -> torch.dtype:
    """bf16 where the CPU multiplies bf16 natively (AMX or AVX512-BF16: oneDNN runs such GEMMs 4-5x
    faster than fp32 ones on a Sapphire Rapids Xeon), else fp32. ``QWEN_PREFILL_DTYPE=fp32|bf16`` overrides."""
    forced = os.environ.get("QWEN_PREFILL_DTYPE", "").lower()
    if forced in ("fp32", "float32"):
        return torch.float32
    if forced in ("bf16", "bfloat16"):
        return torch.bfloat16
    if forced:
        raise ValueError(f"QWEN_PREFILL_DTYPE must be fp32 or bf16, not {forced!r}")
    return torch.bfloat16 if _native_bf16() else torch.float32


def panel_min_rows() -> int:
    """Rows from which ``QuantizedRows.matmul`` beats the int16 kernel (which re-reads the weights every 4
    rows but stays at ~170 GFLOP/s on 2 Xeon cores): 32 with bf16 GEMMs, 128 with fp32 ones (measured on
    Qwen-1.8B layer shapes; docs/quantization.md)."""
    return 32 if prefill_dtype() == torch.bfloat16 else 128


def available() -> bool:
    return library() is not None


def why_unavailable() -> str | None:
    library()
    return _failed


_scratch = threading.local()


def _panel_buffer(elements: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor of at least ``elements`` reused across calls: a fresh 32 MB tensor per
    layer costs its page faults every time (measured: dense() ran at 1-3 instead of 5-6 G elements/s)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < elements:
        buf = bufs[dtype] = torch.empty(elements, dtype=dtype)
    return buf[:elements]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_input(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"the CPU kernels take fp32 CPU activations, got {x.dtype} on {x.device}")
    if x.shape[-1] != k:
        raise ValueError(f"expected {k} input features, got {x.shape[-1]}")
    return x.reshape(-1, k).contiguous()


def gemv_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T + bias, for a few rows of x (decode). fp32, CPU, contiguous weight."""
    lib = library()
    assert lib is not None, why_unavailable()
    n, k = weight.shape
    x2 = _check_input(x, k)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    lib.qwen_gemv_f32(x2.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), x2.shape[0], n, k,
                      torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)


def _interleave_tiles(codes: torch.Tensor) -> torch.Tensor:
    """[N, row_bytes] -> gemv.cpp's order: tiles of 4 rows with their 32-byte chunks interleaved."""
    n, row_bytes = codes.shape
    n4 = n // 4 * 4
    tiles = codes[:n4].reshape(n4 // 4, 4, row_bytes // 32, 32).transpose(1, 2).reshape(n4, row_bytes)
    return torch.cat([tiles, codes[n4:]]).contiguous()


def untile_rows(codes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of tile-ordered codes back in plain [rows, row_bytes] order (start % 4 == 0)."""
    n, row_bytes = codes.shape
    n4 = n // 4 * 4
    if start % 4 or (stop < n4 and stop % 4):
        raise ValueError("rows of the tiled part are taken in whole tiles of 4")
    tiled_stop = min(stop, n4)
    parts = []
    if start < tiled_stop:
        t = (tiled_stop - start) // 4 * 4
        block = codes[start : start + t].reshape(t // 4, row_bytes // 32, 4, 32).transpose(1, 2).reshape(t, row_bytes)
        parts.append(block)
        start += t
    if start < stop:
        parts.append(codes[start:stop])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class QuantizedRows:
    """Weight codes in the kernels' row-major layout, with per-(row, group) scale and scale*zero.

    ``codes`` [N, K] uint8 (integer codes), ``scales``/``zeros`` [N, K/G] floats (true zero points,
    w = scale * (code - zero)). 4-bit codes are repacked into the two-nibbles-per-byte layout of gemv.cpp.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 bias: torch.Tensor | None = None) -> None:
        n, k = codes.shape
        groups = scales.shape[1]
        if bits not in (4, 8):
            raise ValueError(f"the CPU kernels handle 4- and 8-bit codes, not {bits}")
        if k % groups:
            raise ValueError(f"{groups} groups do not divide {k} inputs")
        g = k // groups
        if g % (64 if bits == 4 else 32):
            raise ValueError(f"group size {g} must be a multiple of {64 if bits == 4 else 32} for {bits}-bit")
        self.bits, self.in_features, self.out_features, self.group_size = bits, k, n, g
        # int32 block sums must not overflow: 255 * 32767 * 256 < 2^31, so blocks of at most 256 inputs.
        self.block = g if g <= 256 else next(b for b in (256, 128, 64, 32) if g % b == 0)
        codes = codes.to(torch.uint8)
        if bits == 4:
            blocks = codes.reshape(n, k // 64, 2, 32)
            codes = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)
        self.codes = _interleave_tiles(codes.contiguous())
        self.scales = scales.float().contiguous()
        self.scaled_zeros = (scales.float() * zeros.float()).contiguous()
        self.bias = None if bias is None else bias.float().contiguous()

    def code_matrix(self) -> torch.Tensor:
        """The integer codes [N, K] (uint8) the kernel was built from: the inverse of the constructor's repacking."""
        codes = untile_rows(self.codes, 0, self.out_features)
        if self.bits == 4:
            blocks = codes.reshape(self.out_features, -1, 1, 32)
            codes = torch.cat([blocks & 0x0F, blocks >> 4], dim=2)
        return codes.reshape(self.out_features, self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.scaled_zeros))

    def dense(self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of the weight the codes stand for, [stop - start, K] in fp32 or bf16 (start % 4 == 0)."""
        lib = library()
        assert lib is not None, why_unavailable()
        stop = self.out_features if stop is None else stop
        if start % 4 or not 0 <= start <= stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) of {self.out_features}: start must be a multiple of 4")
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"dense weights are fp32 or bf16, not {dtype}")
        shape = (stop - start, self.in_features)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)}")
        lib.qwen_dequantize_rows(self.codes.data_ptr(), self.scales.data_ptr(), self.scaled_zeros.data_ptr(),
                                 self.out_features, self.in_features, self.group_size, self.bits, start, stop,
                                 out.data_ptr(), int(dtype == torch.bfloat16), torch.get_num_threads())
        return out

    def panels(self, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(n0, n1, W[n0:n1]) in ``dtype``: the whole weight while it has at most PANEL_ELEMENTS, else panels
        of that size, each rebuilt by ``dense`` into one per-thread buffer (valid until the next panel)."""
        k, n = self.in_features, self.out_features
        rows = n if n * k <= PANEL_ELEMENTS else max(4, PANEL_ELEMENTS // k // 4 * 4)
        buf = _panel_buffer(rows * k, dtype).view(rows, k)
        for n0 in range(0, n, rows):
            n1 = min(n0 + rows, n)
            yield n0, n1, self.dense(n0, n1, dtype, buf[: n1 - n0])

    def matmul(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [..., K] @ W^T + bias for many rows (prefill): the GEMM library in ``dtype`` (default
        ``prefill_dtype()``) on the weight rebuilt by ``panels``.

        The activations are not quantized: bf16 rounds each element (relative 2^-9, whatever the other
        elements hold, so outlier channels cost nothing) and fp32 is exact up to summation order."""
        n = self.out_features
        x2 = _check_input(x, self.in_features)
        xd = x2.to(dtype or prefill_dtype())
        y = None
        for n0, n1, w in self.panels(xd.dtype):
            part = torch.nn.functional.linear(xd, w)
            if n1 - n0 == n:  # one panel: no copy into a preallocated output
                y = part.float()
                break
            if y is None:
                y = torch.empty(x2.shape[0], n, dtype=torch.float32)
            y[:, n0:n1] = part
        assert y is not None
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ W^T + bias: the int16 kernel below ``panel_min_rows()`` rows, ``matmul`` from there on."""
        lib = library()
        assert lib is not None, why_unavailable()
        k, n = self.in_features, self.out_features
        if x.numel() >= panel_min_rows() * k:
            return self.matmul(x)
        x2 = _check_input(x, k)
        m = x2.shape[0]
        # Activations as int16 with one scale per row (relative error <= 1.5e-5 of the row's max).
        xi = torch.empty(m, k, dtype=torch.int16)
        xscale = torch.empty(m, dtype=torch.float32)
        xisum = torch.empty(m, k // self.group_size, dtype=torch.float32)
        lib.qwen_quantize_activations(x2.data_ptr(), m, k, self.group_size, xi.data_ptr(), xscale.data_ptr(),
                                      xisum.data_ptr())
        y = torch.empty(m, n, dtype=torch.float32)
        fn = lib.qwen_gemv_q8 if self.bits == 8 else lib.qwen_gemv_q4
        fn(xi.data_ptr(), xscale.data_ptr(), xisum.data_ptr(), self.codes.data_ptr(), self.scales.data_ptr(),
           self.scaled_zeros.data_ptr(), _ptr(self.bias), y.data_ptr(), m, n, k, self.group_size, self.block,
           torch.get_num_threads())
        return y.reshape(*x.shape[:-1], n)
