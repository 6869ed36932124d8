"""Batched copy-engine copies (cudaMemcpyBatchAsync): exact bytes on CUDA, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastic_ep.eplb.copy_engine import batch_copy, engine_available


def test_not_available_on_cpu() -> None:
    assert not engine_available(torch.device("cpu"))


def test_row_arrays_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="row arrays differ in length: 2, 1, 2"):
        batch_copy(np.zeros(2), np.zeros(1), np.zeros(2), None)  # type: ignore[arg-type]


def _engine_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", 0)
    if not engine_available(device):
        pytest.skip("the CUDA runtime has no cudaMemcpyBatchAsync (needs 12.8)")
    return device


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_of_any_size_and_alignment_land_exactly(seed: int) -> None:
    device = _engine_device()
    rng = np.random.default_rng(seed)
    source = torch.randint(0, 256, (1 << 22,), dtype=torch.uint8, device=device)
    target = torch.zeros(1 << 22, dtype=torch.uint8, device=device)
    expected = torch.zeros_like(target)
    src, dst, nbytes = [], [], []
    at = 0
    for _ in range(40):  # disjoint destinations, odd sizes and offsets, some empty rows
        n = int(rng.choice([0, 1, 3, 4096, int(rng.integers(1, 100_000))]))
        s = int(rng.integers(0, source.numel() - n))
        at += int(rng.integers(0, 17))
        src.append(source.data_ptr() + s)
        dst.append(target.data_ptr() + at)
        nbytes.append(n)
        expected[at : at + n] = source[s : s + n]
        at += n
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        batch_copy(np.array(src), np.array(dst), np.array(nbytes), stream)
    torch.cuda.current_stream(device).wait_stream(stream)
    assert torch.equal(target, expected)


@pytest.mark.gpu
def test_the_legacy_default_stream_is_refused() -> None:
    device = _engine_device()
    data = torch.zeros(8, dtype=torch.uint8, device=device)
    ptr = data.data_ptr()
    with pytest.raises(ValueError, match="non-default CUDA stream"):
        batch_copy(
            np.array([ptr]), np.array([ptr + 4]), np.array([4]), torch.cuda.default_stream(device)
        )
