"""Which experts a rank holds, as bits per rank: membership by one gather.

The repair's swap search asks, for thousands of (rank, expert) pairs per step, whether the rank
holds the expert now and whether it held it before. A bool table [R, E] per layer costs R x E to
build (15M cells at 58 layers x 1024 ranks x 256 experts); comparing against the S slots of the
rank costs a reduction per query.

:func:`swap_codes` answers both questions with one gather: two bits per expert (int64 words,
``(E + 32) // 32`` per rank), bit ``2 (e + 1)`` "holds e now" and bit ``2 (e + 1) + 1`` "held e
before"; expert -1 (an empty slot) is never held now and always held before (it costs no
transfer).
"""

from __future__ import annotations

import numpy as np


def before_codes(kept: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [N, W]: the "held before" half of :func:`swap_codes` for ``kept`` (int64 [N, S],
    -1 = empty): bit ``2 (e + 1) + 1`` set where row n holds expert e, and for e = -1 on every
    row (an empty slot costs no transfer); W = (E + 32) // 32 words."""
    rows = kept.shape[0]
    width = (num_experts + 32) // 32
    if width == 1:  # one word per rank: or the slots' bits together
        bit = np.left_shift(1, ((kept + 1) << 1) + 1)
        return np.bitwise_or.reduce(bit, axis=1, keepdims=True) | 2
    ids = kept.T + 1  # [S, N]
    cell = np.arange(rows) * width + (ids >> 5)
    bit = np.left_shift(1, ((ids & 31) << 1) + 1)
    codes = np.zeros(rows * width, dtype=np.int64)
    codes[np.arange(rows) * width] = 2  # bit 1: expert -1 "held before"
    for column in range(kept.shape[1]):  # one cell per row in a column: a plain or is exact
        codes[cell[column]] |= bit[column]
    return codes.reshape(rows, width)


def swap_codes(slots: np.ndarray, before: np.ndarray) -> np.ndarray:
    """int64 [N, W]: ``before`` (:func:`before_codes`) with the "held now" bit ``2 (e + 1)``
    set where row n of ``slots`` (int64 [N, S], -1 = empty) holds expert e (never for e = -1).
    Signed words: the sign bit is one more bit, and shifts then masks read it exactly."""
    rows, width = before.shape
    if width == 1:  # one word per rank (bit 0, expert -1 "held now", cleared)
        bit = np.left_shift(1, (slots + 1) << 1)
        return before | (np.bitwise_or.reduce(bit, axis=1, keepdims=True) & -2)
    ids = slots.T + 1  # [S, N]
    cell = np.arange(rows) * width + (ids >> 5)
    bit = np.left_shift((ids > 0).astype(np.int64), (ids & 31) << 1)
    codes = before.ravel().copy()
    for column in range(slots.shape[1]):
        codes[cell[column]] |= bit[column]
    return codes.reshape(rows, width)


def code_of(codes: np.ndarray, rank: np.ndarray, expert: np.ndarray) -> np.ndarray:
    """int64 (broadcast shape of ``rank`` and ``expert``): 1 x held now + 2 x held before, for
    flat rank ``rank`` and ``expert`` (-1: empty, code 2) in ``codes`` (:func:`swap_codes`)."""
    ids = expert + 1
    width = codes.shape[1]
    cell = rank if width == 1 else rank * width + (ids >> 5)
    return (codes.ravel()[cell] >> ((ids & 31) << 1)) & 3


def trade_codes(
    codes: np.ndarray, first: np.ndarray, second: np.ndarray, x: np.ndarray, y: np.ndarray
) -> None:
    """In ``codes`` (:func:`swap_codes`, C-contiguous, in place), rank ``first[i]`` trades
    expert ``x[i]`` for ``y[i]`` with rank ``second[i]`` (-1 = nothing; no rank twice among
    ``first`` and ``second``): both ranks toggle the "held now" bits of both experts, one
    ``bitwise_xor.at`` (two bits may share a word)."""
    width = codes.shape[1]
    if width == 1:  # both bits in the rank's one word
        toggle = (np.left_shift(1, (x + 1) << 1) ^ np.left_shift(1, (y + 1) << 1)) & -2
        flat = codes.reshape(-1)
        flat[first] ^= toggle
        flat[second] ^= toggle
        return
    ids = np.concatenate([x, y]) + 1
    bit = np.left_shift((ids > 0).astype(np.int64), (ids & 31) << 1)
    word = ids >> 5
    cells = np.concatenate([first, first, second, second]) * width + np.concatenate([word, word])
    np.bitwise_xor.at(codes.reshape(-1), cells, np.concatenate([bit, bit]))
