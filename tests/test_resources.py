"""Epoch-bound resources: dependency order, reverse teardown, failures leave the serving set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.scaling import EpochContext, EpochResources, ResourceError


def _ctx(epoch: int = 1) -> EpochContext:
    return EpochContext(epoch=epoch, rank=0, world_size=2, groups=None)


def test_build_order_deps_and_reverse_teardown() -> None:
    log: list[str] = []
    reg = EpochResources()
    reg.register(
        "a2a",
        lambda c: log.append("build a2a") or f"a2a@{c.epoch}",
        teardown=lambda v: log.append(f"down {v}"),
    )
    reg.register(
        "graph",
        lambda c: log.append("build graph") or (c.deps["a2a"], "graph"),
        teardown=lambda v: log.append("down graph"),
        depends_on=["a2a"],
    )
    first = reg.build(_ctx(1))
    assert reg.install(first) is None
    assert reg.get("graph") == ("a2a@1", "graph")
    second = reg.build(_ctx(2))
    assert reg.get("a2a") == "a2a@1"  # building does not install
    old = reg.install(second)
    assert old is first
    old.teardown()
    assert log == [
        "build a2a",
        "build graph",
        "build a2a",
        "build graph",
        "down graph",
        "down a2a@1",
    ]
    assert reg.get("a2a") == "a2a@2"


def test_registration_errors_leave_registry_unchanged() -> None:
    reg = EpochResources()
    reg.register("x", lambda c: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", lambda c: 2)
    with pytest.raises(ValueError, match="unregistered"):
        reg.register("y", lambda c: 2, depends_on=("nope",))
    with pytest.raises(TypeError, match="callable"):
        reg.register("z", 3)  # type: ignore[arg-type]
    assert reg.order == ("x",)
    with pytest.raises(KeyError, match="no resources installed"):
        reg.get("x")


def test_build_failure_tears_down_partial_set() -> None:
    down: list[str] = []
    reg = EpochResources()
    reg.register("ok", lambda c: "ok", teardown=down.append)
    reg.register("bad", lambda c: 1 / 0)
    with pytest.raises(ResourceError, match="'bad'") as err:
        reg.build(_ctx())
    assert err.value.resource == "bad"
    assert down == ["ok"]
    assert reg.current is None


def test_teardown_runs_every_hook_then_raises_first() -> None:
    down: list[str] = []
    reg = EpochResources()
    reg.register("a", lambda c: "a", teardown=down.append)
    reg.register("b", lambda c: "b", teardown=lambda v: 1 / 0)
    built = reg.build(_ctx())
    with pytest.raises(ResourceError, match="teardown of resource 'b'"):
        built.teardown()
    assert down == ["a"]
    built.teardown()  # idempotent: nothing left
    assert built.names() == ()


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=n, max_size=n),
        )
    )
)
def test_random_dags_build_after_deps_and_tear_down_once(
    case: tuple[int, list[list[bool]]],
) -> None:
    n, adjacency = case
    built: list[str] = []
    down: list[str] = []
    reg = EpochResources()
    deps = {}
    for i in range(n):
        name = f"r{i}"
        deps[name] = [f"r{j}" for j in range(i) if adjacency[i][j]]
        reg.register(
            name,
            lambda c, name=name: built.append(name) or name,
            teardown=down.append,
            depends_on=deps[name],
        )
    reg.build(_ctx()).teardown()
    for name, ds in deps.items():
        assert all(built.index(d) < built.index(name) for d in ds)
        assert all(down.index(d) > down.index(name) for d in ds)
    assert sorted(down) == sorted(built) and len(down) == n
