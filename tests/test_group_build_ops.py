"""A gloo group build's TCPStore calls per rank do not grow with the group (MeshStore)."""

from __future__ import annotations

import pytest
import torch

from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.testing.counting_store import StoreCounts, count_rendezvous_stores
from tests.procs import run_ranks


def _build(rank: int, world_size: int, port: int) -> tuple[int, int, float]:
    """(store calls, keys named, all-reduce result) of one group build on this rank."""
    counts = StoreCounts(lambda key: "group" if key.startswith("group/") else "other")
    count_rendezvous_stores(counts)
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=20)
    g = StatelessGroup(rdzv, "world", 0, rank, world_size, timeout_s=10)
    calls, keys = counts.calls["group"], counts.keys["group"]
    total = g.all_reduce(torch.tensor([1.0])).item()  # the mesh built by the bulk read works
    g.destroy()
    rdzv.close()
    return calls, keys, total


@pytest.mark.parametrize("world_size", [2, 6])
def test_a_group_build_makes_the_same_store_calls_per_rank_at_any_size(world_size: int) -> None:
    results = run_ranks(_build, world_size, timeout=60)
    assert [r[2] for r in results] == [float(world_size)] * world_size
    calls = {r[0] for r in results}
    # the gate: add arrived/<r>, add gate, then set gate/open (last) or wait for it;
    # gloo through the MeshStore: set own address, wait for all, multi_get all
    assert calls == {6}, calls
    # the bulk read names every rank's key once; gloo's own path read 2R keys one call each
    assert {r[1] for r in results} == {6 + 2 * (world_size - 1)}
