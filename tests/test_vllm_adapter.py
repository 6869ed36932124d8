"""The vLLM EPLB policy adapter, without vLLM installed and against vLLM's own classes when the
wheel is available (``ELASTIC_EP_VLLM_WHEEL`` or ``.carry/wheels/vllm-*.whl``)."""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.adapters.vllm import (
    ElasticEplbPolicy,
    PolicyArgumentError,
    load_policy_modules,
    register,
    vllm_policy_class,
)
from elastic_ep.eplb import Placement
from tests.test_planner import make_load


def find_wheel() -> Path | None:
    named = os.environ.get("ELASTIC_EP_VLLM_WHEEL")
    if named:
        return Path(named)
    found = sorted((Path(__file__).parent.parent / ".carry" / "wheels").glob("vllm-*.whl"))
    return found[-1] if found else None


def test_signature_and_output() -> None:
    weight = torch.from_numpy(make_load("lognormal", 4, 32, seed=1))
    phy2log = ElasticEplbPolicy.rebalance_experts(weight, 40, 4, 2, 4)
    assert phy2log.dtype == torch.int64 and phy2log.shape == (4, 40)
    Placement(phy2log, 32, 4).validate(distinct_ranks=True)
    # hierarchical: 4 groups of 8 experts, 2 nodes of 2 ranks (20 slots each)
    for layer in range(4):
        for node in range(2):
            groups = (phy2log[layer, node * 20 : (node + 1) * 20] // 8).unique()
            assert groups.numel() == 2


def test_movement_aware_with_old_indices() -> None:
    load = make_load("lognormal", 6, 32, seed=2)
    old = ElasticEplbPolicy.rebalance_experts(torch.from_numpy(load), 40, 1, 1, 4)
    drifted = torch.from_numpy(load * np.random.default_rng(3).lognormal(0, 0.1, load.shape))
    kept = ElasticEplbPolicy.rebalance_experts(drifted, 40, 1, 1, 4, old)
    fresh = ElasticEplbPolicy.rebalance_experts(drifted, 40, 1, 1, 4)
    before = Placement(old, 32, 4)
    moved_kept = int(Placement(kept, 32, 4).transfers_from(before).sum())
    moved_fresh = int(Placement(fresh, 32, 4).transfers_from(before).sum())
    assert moved_kept < moved_fresh


def test_scale_event_through_old_indices() -> None:
    load = torch.from_numpy(make_load("zipf", 3, 16, seed=4))
    old = ElasticEplbPolicy.rebalance_experts(load, 20, 1, 1, 4)  # 4 ranks x 5 slots
    new = ElasticEplbPolicy.rebalance_experts(load, 25, 1, 1, 5, old)  # one rank joins
    placement = Placement(new, 16, 5)
    placement.validate(distinct_ranks=True)
    assert torch.equal(new[:, :20] >= 0, torch.ones(3, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a multiple of num_ranks"):
        ElasticEplbPolicy.rebalance_experts(load, 21, 1, 1, 4)


class StandInAbstract(abc.ABC):
    """Shape of vLLM's AbstractEplbPolicy, for the registry logic."""

    @classmethod
    @abc.abstractmethod
    def rebalance_experts(cls, *args: object) -> torch.Tensor: ...


StandInAbstract.__name__ = "AbstractEplbPolicy"


def test_register_replaces_default_policy() -> None:
    class Default(StandInAbstract):
        @classmethod
        def rebalance_experts(cls, *args: object) -> torch.Tensor:
            raise AssertionError("the old policy must not be used")

    registry: dict = {"default": Default}
    register(registry)
    policy = registry["default"]
    assert issubclass(policy, StandInAbstract) and issubclass(policy, ElasticEplbPolicy)
    policy()  # not abstract any more
    out = policy.rebalance_experts(torch.ones(2, 8), 8, 1, 1, 2)
    assert out.shape == (2, 8)


def test_policy_class_without_vllm_raises_import_error() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            vllm_policy_class()
    else:
        pytest.skip("vllm is installed")


@pytest.mark.skipif(
    find_wheel() is None, reason="no vLLM wheel (pip download vllm==0.33.0 --no-deps)"
)
def test_against_real_vllm_classes() -> None:
    abstract, default, version = load_policy_modules(find_wheel())
    assert version.startswith("0.")
    policy = vllm_policy_class(abstract.AbstractEplbPolicy)
    assert issubclass(policy, abstract.AbstractEplbPolicy)
    policy()
    registry = {"default": default.DefaultEplbPolicy}
    register(registry)
    assert issubclass(registry["default"], abstract.AbstractEplbPolicy)
    for kind in ("lognormal", "zipf"):
        weight = torch.from_numpy(make_load(kind, 8, 64, seed=5))
        ours = Placement(registry["default"].rebalance_experts(weight, 80, 1, 1, 8), 64, 8)
        theirs = Placement(default.DefaultEplbPolicy.rebalance_experts(weight, 80, 1, 1, 8), 64, 8)
        ours.validate(distinct_ranks=True)
        assert ours.balancedness(weight) >= theirs.balancedness(weight) - 1e-9


def test_bad_num_replicas_is_value_and_assertion_error() -> None:
    weight = torch.ones(1, 4)
    for kind in (ValueError, AssertionError, PolicyArgumentError):
        with pytest.raises(kind, match="not a multiple of num_ranks"):
            ElasticEplbPolicy.rebalance_experts(weight, 7, 2, 2, 4)


@st.composite
def old_and_new_maps(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    layers = draw(st.integers(1, 3))
    ranks = draw(st.integers(1, 4))
    slots = draw(st.integers(1, 5))
    experts = draw(st.integers(1, 6))
    values = st.integers(-1, experts - 1)
    shape = (layers, ranks * slots)
    old = np.array(
        draw(st.lists(values, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    )
    new = np.array(
        draw(st.lists(values, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    )
    return old.reshape(shape), new.reshape(shape), ranks


@settings(max_examples=200, deadline=None)
@given(old_and_new_maps())
def test_preserve_intragpu_slots_properties(maps: tuple[np.ndarray, np.ndarray, int]) -> None:
    old, new, ranks = maps
    post = ElasticEplbPolicy.preserve_intragpu_slots(new, ranks, old)
    slots = new.shape[1] // ranks
    for layer in range(new.shape[0]):
        for rank in range(ranks):
            cut = slice(rank * slots, (rank + 1) * slots)
            old_seg, new_seg, post_seg = old[layer, cut], new[layer, cut], post[layer, cut]
            # the rank holds the same experts as the new map says
            assert sorted(post_seg.tolist()) == sorted(new_seg.tolist())
            # an expert kept on the rank sits in its old slots, as often as it is kept
            for expert in set(old_seg.tolist()):
                keep = min(int((old_seg == expert).sum()), int((new_seg == expert).sum()))
                first_old = np.flatnonzero(old_seg == expert)[:keep]
                assert (post_seg[first_old] == expert).all()


def test_rebalance_keeps_kept_experts_in_their_slots() -> None:
    load = make_load("zipf", 4, 32, seed=6)
    old = ElasticEplbPolicy.rebalance_experts(torch.from_numpy(load), 48, 1, 1, 6)
    drifted = load * np.random.default_rng(7).lognormal(0, 0.2, load.shape)
    new = ElasticEplbPolicy.rebalance_experts(torch.from_numpy(drifted), 48, 1, 1, 6, old)
    assert not np.array_equal(new.numpy(), old.numpy())
    post = ElasticEplbPolicy.preserve_intragpu_slots(new.numpy(), 6, old.numpy())
    assert np.array_equal(post, new.numpy())


def test_preserve_intragpu_slots_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        ElasticEplbPolicy.preserve_intragpu_slots(np.zeros((1, 8)), 2, np.zeros((1, 6)))
    with pytest.raises(ValueError, match="not a multiple of num_ranks=3"):
        ElasticEplbPolicy.preserve_intragpu_slots(np.zeros((1, 8)), 3, np.zeros((1, 8)))


@pytest.mark.skipif(
    find_wheel() is None, reason="no vLLM wheel (pip download vllm==0.33.0 --no-deps)"
)
@settings(max_examples=200, deadline=None)
@given(old_and_new_maps())
def test_preserve_intragpu_slots_equals_vllms(maps: tuple[np.ndarray, np.ndarray, int]) -> None:
    old, new, ranks = maps
    _, default, _ = load_policy_modules(find_wheel())
    theirs = default.DefaultEplbPolicy.preserve_intragpu_slots(new, ranks, old)
    assert np.array_equal(ElasticEplbPolicy.preserve_intragpu_slots(new, ranks, old), theirs)
