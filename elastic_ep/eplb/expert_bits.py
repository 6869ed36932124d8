"""Which experts a rank holds, as a bit set per rank: membership by one gather.

The repair's swap search asks, for thousands of (rank, expert) pairs per step, whether the rank
holds the expert now or held it before. A bool table [R, E] per layer costs R x E to build (15M
cells at 58 layers x 1024 ranks x 256 experts); comparing against the S slots of the rank costs
a reduction per query. Bit ``e + 1`` of row r (uint64 words, ``(E + 64) // 64`` per rank) is set
where rank r holds expert e; bit 0 ("empty", expert -1) is never set, so an empty slot is never
"held".
"""

from __future__ import annotations

import numpy as np


def expert_bits(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """uint64 [N, W]: bit ``e + 1`` set where row n of ``slots`` (int64 [N, S], -1 = empty)
    holds expert e; W = (E + 64) // 64 words (bit 0, "empty", is never set)."""
    rows = slots.shape[0]
    width = (num_experts + 64) // 64
    ids = slots.T + 1  # [S, N]: one slot column per row, contiguous
    cell = np.arange(rows) * width + (ids >> 6)
    mask = np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64))
    mask[ids == 0] = 0  # an empty slot sets nothing
    bits = np.zeros(rows * width, dtype=np.uint64)
    # Column by column: within a column every row has one cell, so a plain fancy-index or is
    # exact (no ``bitwise_or.at``, several times slower per element).
    for column in range(slots.shape[1]):
        bits[cell[column]] |= mask[column]
    return bits.reshape(rows, width)


def has_expert(bits: np.ndarray, rank: np.ndarray, expert: np.ndarray) -> np.ndarray:
    """bool (broadcast shape of ``rank`` and ``expert``): whether flat rank ``rank`` holds
    ``expert`` (-1 = nothing: False) in ``bits`` (from :func:`expert_bits`)."""
    ids = expert + 1
    word = bits.ravel()[rank * bits.shape[1] + (ids >> 6)]
    return (np.right_shift(word, (ids & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)


def has_expert_in(
    tables: tuple[np.ndarray, ...], rank: np.ndarray, expert: np.ndarray
) -> list[np.ndarray]:
    """:func:`has_expert` for each of ``tables`` (bit sets of one width), the word index and
    bit computed once."""
    ids = expert + 1
    cell = rank * tables[0].shape[1] + (ids >> 6)
    shift = (ids & 63).astype(np.uint64)
    one = np.uint64(1)
    return [(np.right_shift(t.ravel()[cell], shift) & one).astype(bool) for t in tables]


def swap_bits(
    bits: np.ndarray, first: np.ndarray, second: np.ndarray, x: np.ndarray, y: np.ndarray
) -> None:
    """In ``bits``, rank ``first[i]`` trades expert ``x[i]`` for ``y[i]`` with rank
    ``second[i]`` (-1 = nothing); each rank holds exactly one of the two before, so both
    ranks toggle the same two bits: one ``bitwise_xor.at`` (bit 0, "empty", toggles never).
    ``bits`` is C-contiguous (from :func:`expert_bits`), updated in place."""
    width = bits.shape[1]
    ids = np.concatenate([x, y]) + 1
    mask = np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64))
    mask[ids == 0] = 0
    words = ids >> 6
    cells = np.concatenate([first, first, second, second]) * width + np.concatenate([words, words])
    np.bitwise_xor.at(bits.reshape(-1), cells, np.concatenate([mask, mask]))
