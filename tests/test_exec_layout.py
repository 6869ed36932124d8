"""The executor's chunk layout (pure): every rank's regions agree with its peers', row for row."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import GroupRanks, plan_transfers
from elastic_ep.eplb.exec_chunks import cut_chunks, min_buffer_bytes
from elastic_ep.eplb.exec_layout import BUFFER, Layout, RowSet, aligned, lay_out_chunks
from tests.test_transfer_plan import KINDS, make_scenario


def _rows(rows: RowSet) -> list[tuple[int, int, int, int, int]]:
    columns = (rows.src_tensor, rows.src_offset, rows.dst_tensor, rows.dst_offset, rows.nbytes)
    return list(zip(*(c.tolist() for c in columns), strict=True))


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.integers(0, 2**31),
    st.integers(2, 4),
    st.lists(st.lists(st.sampled_from([2, 6, 64, 300]), min_size=1, max_size=3), min_size=1),
    st.sampled_from([1, 2, 5, 100]),
    st.booleans(),
)
def test_regions_match_between_peers_and_stay_in_the_buffer(
    kind: str,
    seed: int,
    world: int,
    kinds_per_layer: list[list[int]],
    budget_factor: int,
    overlap: bool,
) -> None:
    """For every chunk and every sender -> receiver pair, the byte at each offset of the send
    region holds the (layer, kind, expert) that the receiver's write-back puts in a slot that
    wants it; every row stays inside its chunk's region, inside the buffer; no launch writes a
    byte twice; a region is no larger than its chunk's estimate."""
    sc = make_scenario(kind, seed, world, 3, 8)
    plan = plan_transfers(sc.previous, sc.new, sc.mapping, dead_ranks=sc.dead)
    layers = plan.new.num_layers
    kind_bytes = [kinds_per_layer[layer % len(kinds_per_layer)] for layer in range(layers)]
    kinds = max(len(k) for k in kind_bytes)
    row_bytes = [sum(aligned(b) for b in layer) for layer in kind_bytes]
    group_world = max(plan.rank_mapping.old_world_size, plan.rank_mapping.new_world_size)
    ranks = GroupRanks.for_world_size(plan.rank_mapping, group_world)
    budget = min_buffer_bytes(plan, row_bytes, ranks) * budget_factor
    chunks = cut_chunks(plan, row_bytes, ranks, budget, overlap)
    starts = [0, *itertools.accumulate(len(c.steps) for c in chunks)]
    buffer_bytes = budget

    def what(tensor: int, offset: int, placement_slot_expert: np.ndarray) -> tuple[int, int, int]:
        layer, k = divmod(tensor - 1, kinds)
        return layer, k, int(placement_slot_expert[layer, offset // kind_bytes[layer][k]])

    layouts: dict[int, Layout] = {}
    members: dict[int, tuple[int | None, int | None]] = {}
    for g in range(group_world):
        old = ranks.old.index(g) if g in ranks.old else None
        new = ranks.new.index(g) if g in ranks.new else None
        members[g] = (old, new)
        layouts[g] = lay_out_chunks(plan, starts, kind_bytes, ranks, old, new, buffer_bytes)
    for c, chunk in enumerate(chunks):
        for g, (old, _new) in members.items():
            lay = layouts[g].chunks[c]
            pack, direct, unpack = (
                r.of_chunk(c) for r in (layouts[g].pack, layouts[g].direct, layouts[g].unpack)
            )
            assert lay.nbytes <= chunk.bytes_on(g)
            assert lay.base >= 0 and lay.base + lay.nbytes <= buffer_bytes
            assert [len(r.nbytes) for r in (pack, direct, unpack)] == [
                int(np.diff(r.bounds)[c])
                for r in (layouts[g].pack, layouts[g].direct, layouts[g].unpack)
            ]
            for rows in (pack, direct, unpack):
                written = set()
                for src, src_at, dst, dst_at, n in _rows(rows):
                    for tensor, at in ((src, src_at), (dst, dst_at)):
                        if tensor == BUFFER:
                            assert lay.base <= at and at + n <= lay.base + lay.nbytes
                    span = {(dst, b) for b in range(dst_at, dst_at + n)}
                    assert not written & span
                    written |= span
            # What the sender's region holds, byte for byte, by (layer, kind, expert).
            if old is None:
                continue
            previous = plan.previous.phy2log.view(
                plan.previous.num_layers, -1, plan.previous.slots_per_rank
            )[:, old].numpy()
            sent = {}
            for src, src_at, _, dst_at, n in _rows(pack):
                for peer, at, size in lay.sends:
                    if at <= dst_at < at + size:
                        sent[(peer, dst_at - at)] = (n, what(src, src_at, previous))
            for peer, _at, size in lay.sends:
                receiver = layouts[peer].chunks[c]
                receiver_unpack = layouts[peer].unpack.of_chunk(c)
                (back,) = [r for r in receiver.recvs if r[0] == g]
                assert back[2] == size
                new_rank = members[peer][1]
                assert new_rank is not None
                wanted = plan.new.phy2log.view(plan.new.num_layers, -1, plan.new.slots_per_rank)[
                    :, new_rank
                ].numpy()
                got = {}
                for src, src_at, dst, dst_at, n in _rows(receiver_unpack):
                    if src == BUFFER and back[1] <= src_at < back[1] + size:
                        got[(g, src_at - back[1])] = (n, what(dst, dst_at, wanted))
                mine = {key: value for key, value in sent.items() if key[0] == peer}
                assert {(g, k[1]): v for k, v in mine.items()} == got


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 2**31), st.integers(2, 4), st.data())
def test_a_batch_of_chunks_is_laid_out_as_in_the_whole(
    kind: str, seed: int, world: int, data: st.DataObject
) -> None:
    """``execute`` lays chunks out in batches: any range of chunks comes out as the same
    chunks of the whole layout."""
    sc = make_scenario(kind, seed, world, 3, 8)
    plan = plan_transfers(sc.previous, sc.new, sc.mapping, dead_ranks=sc.dead)
    kind_bytes = [[64, 6]] * plan.new.num_layers
    row_bytes = [sum(aligned(b) for b in layer) for layer in kind_bytes]
    group_world = max(plan.rank_mapping.old_world_size, plan.rank_mapping.new_world_size)
    ranks = GroupRanks.for_world_size(plan.rank_mapping, group_world)
    budget = min_buffer_bytes(plan, row_bytes, ranks) * 2
    chunks = cut_chunks(plan, row_bytes, ranks, budget, True)
    starts = [0, *itertools.accumulate(len(c.steps) for c in chunks)]
    g = data.draw(st.integers(0, group_world - 1))
    old = ranks.old.index(g) if g in ranks.old else None
    new = ranks.new.index(g) if g in ranks.new else None
    whole = lay_out_chunks(plan, starts, kind_bytes, ranks, old, new, budget)
    if not chunks:  # a drift that moves nothing
        assert not plan.steps and not whole.chunks
        return
    first = data.draw(st.integers(0, len(chunks) - 1))
    last = data.draw(st.integers(first + 1, len(chunks)))
    part = lay_out_chunks(plan, starts, kind_bytes, ranks, old, new, budget, first, last)
    assert part.chunks == whole.chunks[first:last]
    for c in range(first, last):
        for name in ("pack", "direct", "unpack"):
            assert _rows(getattr(part, name).of_chunk(c - first)) == _rows(
                getattr(whole, name).of_chunk(c)
            )
