"""Single-process properties: key prefixes, layouts, Rendezvous from the environment, epochs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_ep.groups import GroupLayout, Rendezvous
from elastic_ep.groups.rendezvous import prefix_of
from tests.procs import free_port

_part = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.text(alphabet=st.characters(blacklist_characters="/"), min_size=1, max_size=6),
)


@given(st.lists(_part, min_size=1, max_size=4), st.lists(_part, min_size=1, max_size=4))
def test_prefixes_are_injective(a: list[str | int], b: list[str | int]) -> None:
    # Two different (group, epoch) scopes never share a prefix, so their keys never mix.
    norm_a, norm_b = [str(x) for x in a], [str(x) for x in b]
    assert (prefix_of(*a) == prefix_of(*b)) == (norm_a == norm_b)


@pytest.mark.parametrize(
    ("parts", "exc"),
    [((), ValueError), (("a/b",), ValueError), (("",), ValueError), ((-1,), ValueError),
     ((True,), TypeError), ((1.5,), TypeError)],
)  # fmt: skip
def test_bad_prefix_parts(parts: tuple, exc: type) -> None:
    with pytest.raises(exc):
        prefix_of(*parts)


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[int, dict[str, int]]:
    size = draw(st.integers(min_value=1, max_value=6))
    world = size * draw(st.integers(min_value=1, max_value=6))
    return world, {"part": size}


@given(_layouts())
def test_block_layout_covers_every_rank_once(case: tuple[int, dict[str, int]]) -> None:
    world, sizes = case
    layout = GroupLayout.blocks(world, **sizes)
    groups = layout.partitions["part"]
    assert sorted(r for g in groups for r in g) == list(range(world))
    for rank in range(world):
        index, ranks = layout.group_of("part", rank)
        assert groups[index] == ranks and rank in ranks and len(ranks) == sizes["part"]


@given(st.permutations(list(range(7))), st.integers(min_value=1, max_value=7))
def test_arbitrary_partitions_validate(perm: list[int], cut: int) -> None:
    groups = (tuple(perm[:cut]), tuple(perm[cut:])) if cut < 7 else (tuple(perm),)
    layout = GroupLayout(7, {"x": groups})
    assert layout.partitions["x"] == groups
    with pytest.raises(ValueError, match="exactly once"):
        GroupLayout(8, {"x": groups})


def test_rendezvous_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    master = Rendezvous.from_env(timeout_s=5)
    assert master.is_master
    monkeypatch.setenv("RANK", "3")
    client = Rendezvous.from_env(timeout_s=5)
    assert not client.is_master
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("GROUP_RANK", "1")
    assert not Rendezvous.from_env(timeout_s=5).is_master
    monkeypatch.setenv("ELASTIC_EP_STORE_MASTER", "maybe")
    with pytest.raises(ValueError, match="ELASTIC_EP_STORE_MASTER"):
        Rendezvous.from_env()
    monkeypatch.delenv("ELASTIC_EP_STORE_MASTER")
    monkeypatch.delenv("GROUP_RANK")
    with pytest.raises(ValueError, match="RANK"):
        Rendezvous.from_env()
    monkeypatch.setenv("MASTER_PORT", "http")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        Rendezvous.from_env()

    # Scoped views never see each other's keys; epochs from the counter only grow.
    master.scoped("world", "epoch", 3).set("k", "old")
    assert not client.scoped("world", "epoch", 4).check(["k"])
    assert client.scoped("world", "epoch", 3).get("k") == b"old"
    epochs = [master.next_epoch("world"), client.next_epoch("world"), master.next_epoch("world")]
    assert epochs == sorted(set(epochs)) and len(epochs) == 3
    assert client.next_epoch("other") == 1
    client.close()
    client.close()
    with pytest.raises(ValueError, match="closed"):
        client.store  # noqa: B018
    master.close()


def test_rendezvous_bad_arguments_and_port_zero() -> None:
    with pytest.raises(ValueError, match="port"):
        Rendezvous("127.0.0.1", 0, is_master=False)
    with pytest.raises(ValueError, match="port"):
        Rendezvous("127.0.0.1", -1, is_master=True)
    master = Rendezvous("127.0.0.1", 0, is_master=True)  # binds a free port
    assert 0 < master.port < 65536
    client = Rendezvous("127.0.0.1", master.port, is_master=False)
    client.store.set("k", "v")
    assert master.store.get("k") == b"v"
    client.close()
    master.close()
    with pytest.raises(ValueError, match="host"):
        Rendezvous("", 1234, is_master=True)
    with pytest.raises(ValueError, match="timeout_s"):
        Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=0)
