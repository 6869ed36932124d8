"""Copy many byte rows on one GPU with its copy engines: one ``cudaMemcpyBatchAsync`` call.

Why: they take no SMs, which suits a rebalance that runs beside the model's own kernels. It is
not ``execute``'s default: on one H200 (``benchmarks/bench_row_copy.py --beside-nccl``, NCCL held
to 8-16 channels) an NCCL send/recv kept 81-85% of its speed beside copy-engine copies against
96-99% beside the Triton copy's grid, and alone the engines moved expert rows at 1.1-1.3 TB/s
against the kernel's 1.3-1.4; on 2x H200 the executor's reshuffle took 43 ms with them, 30 ms
with Triton.

The driver spends about 3.5 us of host time and of copy-engine time per row, so rows should be
large: 1 MB rows moved at 0.27 TB/s, 11.5 MB rows (an expert's ``w13``) at 1.3 TB/s.

``cudaMemcpyBatchAsync`` exists from CUDA 12.8. It is called through ``ctypes`` in the CUDA runtime
that torch itself loaded, so nothing is built or installed; where that runtime is older, or
statically linked, :func:`engine_available` is False and the executor uses another copy path.
CUDA 12.8 and 12.9 take an extra ``failIdx`` argument that CUDA 13 dropped.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

_SRC_ACCESS_ORDER_STREAM = 1  # cudaMemcpySrcAccessOrderStream: read the source in stream order
_PREFER_OVERLAP_WITH_COMPUTE = 1  # cudaMemcpyFlagPreferOverlapWithCompute: keep off the SMs
_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice (a hint; ignored for cudaMalloc'd memory)


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_location_hint", _MemLocation),
        ("dst_location_hint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


class _Runtime:
    """The batch-copy entry point of the loaded CUDA runtime, with its version's signature."""

    def __init__(self, library: ctypes.CDLL) -> None:
        version = ctypes.c_int()
        if library.cudaRuntimeGetVersion(ctypes.byref(version)) != 0:
            raise OSError("cudaRuntimeGetVersion failed")
        self.version = version.value
        if self.version < 12080:
            raise OSError(f"CUDA runtime {self.version} has no cudaMemcpyBatchAsync (needs 12.8)")
        self.with_fail_index = self.version < 13000
        self.batch = library.cudaMemcpyBatchAsync
        pointer, size = ctypes.c_void_p, ctypes.c_size_t
        # dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, [failIdx,] stream
        self.batch.argtypes = (pointer, pointer, pointer, size, pointer, pointer, size) + (
            (pointer, pointer) if self.with_fail_index else (pointer,)
        )
        self.batch.restype = ctypes.c_int
        self.error_string = library.cudaGetErrorString
        self.error_string.argtypes = [ctypes.c_int]
        self.error_string.restype = ctypes.c_char_p


@functools.cache
def _runtime() -> _Runtime | None:
    if torch.version.cuda is None:
        return None
    major = torch.version.cuda.split(".")[0]
    try:
        # torch loaded this runtime already; dlopen returns that copy.
        return _Runtime(ctypes.CDLL(f"libcudart.so.{major}"))
    except (OSError, AttributeError):
        return None


def batch_copy(
    src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, stream: torch.cuda.Stream
) -> None:
    """Enqueue one batch of device-to-device row copies on ``stream`` (copy engines).

    Args:
        src / dst / nbytes: int64 or uint64 ``[rows]``: source address, destination address and
            byte length of each row (rows of 0 bytes are skipped). Rows are copied in no
            particular order: no row may overlap another's destination or read what another
            row writes.
        stream: a CUDA stream that is not the legacy default stream (the API refuses it).
    Raises:
        RuntimeError: the runtime has no batch copy (see :func:`engine_available`), or it failed.
    """
    if not len(src) == len(dst) == len(nbytes):
        raise ValueError(f"row arrays differ in length: {len(src)}, {len(dst)}, {len(nbytes)}")
    runtime = _runtime()
    if runtime is None:
        raise RuntimeError("cudaMemcpyBatchAsync is not available (needs torch with CUDA >= 12.8)")
    keep = np.asarray(nbytes) > 0
    rows = [np.ascontiguousarray(np.asarray(a)[keep], dtype=np.uint64) for a in (dst, src, nbytes)]
    count = len(rows[0])
    if not count:
        return
    if stream.cuda_stream == 0:
        raise ValueError("batch_copy needs a non-default CUDA stream")
    attributes = _MemcpyAttributes(
        _SRC_ACCESS_ORDER_STREAM,
        _MemLocation(_LOCATION_DEVICE, stream.device.index),
        _MemLocation(_LOCATION_DEVICE, stream.device.index),
        _PREFER_OVERLAP_WITH_COMPUTE,
    )
    first_row = (ctypes.c_size_t * 1)(0)  # the one attribute applies from row 0 on
    arguments: list[object] = [
        *(a.ctypes.data for a in rows),
        count,
        ctypes.byref(attributes),
        first_row,
        1,
    ]
    if runtime.with_fail_index:
        arguments.append(ctypes.byref(ctypes.c_size_t()))
    error = runtime.batch(*arguments, ctypes.c_void_p(stream.cuda_stream))
    if error:
        raise RuntimeError(
            f"cudaMemcpyBatchAsync failed: {runtime.error_string(error).decode()} ({error})"
        )


@functools.cache
def engine_available(device: torch.device) -> bool:
    """Whether :func:`batch_copy` works on ``device``: checked once per device with a small
    batch whose bytes are compared (the driver may lack the call even where the runtime has it)."""
    device = torch.device(device)
    if device.type != "cuda" or _runtime() is None:
        return False
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            data = torch.arange(64, dtype=torch.uint8, device=device)
            expected = data.clone()
            expected[32:48] = data[0:16]
            expected[48:51] = data[21:24]
            base = data.data_ptr()
            try:
                batch_copy(
                    np.array([base, base + 21]),
                    np.array([base + 32, base + 48]),
                    np.array([16, 3]),
                    stream,
                )
            except RuntimeError:
                return False
            return bool(torch.equal(data, expected))
