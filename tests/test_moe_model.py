"""The seeded model, the reference forward and the layer's argument checks (single process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import Placement, PlacementBuffers
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.moe import (
    DISPATCH_RESOURCE,
    AllToAllBackend,
    EPMoELayer,
    LoadRecord,
    MoEModelConfig,
    build_local_model,
    expert_mlp,
    reference_moe,
    register_dispatch_backend,
    run_local_experts,
    seeded_expert,
    seeded_gate,
)
from elastic_ep.moe.all_to_all import _grouped_position
from elastic_ep.scaling.resources import EpochContext, EpochResources, ResourceError

CONFIG = MoEModelConfig(
    num_layers=2, num_experts=6, hidden_size=8, intermediate_size=4, top_k=2, seed=1
)


def test_seeded_weights_are_deterministic_and_distinct() -> None:
    w13, w2 = seeded_expert(CONFIG, 1, 3)
    assert w13.shape == (8, 8) and w2.shape == (8, 4) and w13.dtype == torch.float32
    again = seeded_expert(CONFIG, 1, 3)
    assert torch.equal(w13, again[0]) and torch.equal(w2, again[1])
    others = [seeded_expert(CONFIG, 1, 2)[0], seeded_expert(CONFIG, 0, 3)[0]]
    others.append(seeded_expert(MoEModelConfig(**{**CONFIG.__dict__, "seed": 2}), 1, 3)[0])
    assert not any(torch.equal(w13, o) for o in others)
    assert torch.equal(seeded_gate(CONFIG, 0), seeded_gate(CONFIG, 0))
    assert not torch.equal(seeded_gate(CONFIG, 0), seeded_gate(CONFIG, 1))
    with pytest.raises(ValueError, match="outside 2 layers x 6 experts"):
        seeded_expert(CONFIG, 0, 6)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoEModelConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="hidden_size"):
        MoEModelConfig(hidden_size=0)
    with pytest.raises(TypeError, match="seed"):
        MoEModelConfig(seed=1.5)  # type: ignore[arg-type]


def test_reference_moe_equals_a_per_token_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 8, generator=gen)
    experts = [seeded_expert(CONFIG, 0, e) for e in range(6)]
    w13, w2 = torch.stack([w[0] for w in experts]), torch.stack([w[1] for w in experts])
    gate = seeded_gate(CONFIG, 0)
    out = reference_moe(hidden, gate, w13, w2, 2)
    probs = torch.softmax(hidden @ gate.t(), -1)
    for t in range(5):
        top = probs[t].topk(2)
        weights = top.values / top.values.sum()
        expected = torch.stack(
            [
                float(w) * expert_mlp(hidden[t : t + 1], w13[e], w2[e])[0]
                for w, e in zip(weights, top.indices.tolist(), strict=True)
            ]
        ).sum(0)
        assert torch.allclose(out[t], expected, atol=1e-6)


def test_run_local_experts_uses_each_slots_weights() -> None:
    experts = [seeded_expert(CONFIG, 0, e) for e in (4, 1)]
    w13, w2 = torch.stack([w[0] for w in experts]), torch.stack([w[1] for w in experts])
    tokens = torch.randn(5, 8)
    out = run_local_experts(tokens, (2, 3), w13, w2)
    assert torch.allclose(out[:2], expert_mlp(tokens[:2], *experts[0]))
    assert torch.allclose(out[2:], expert_mlp(tokens[2:], *experts[1]))
    with pytest.raises(ValueError, match="3 local slots"):
        run_local_experts(tokens, (2, 3, 0), w13, w2)


def test_build_local_model_loads_the_ranks_slots() -> None:
    placement = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 5, -1]] * 2), 6, 2)
    buffers = PlacementBuffers(2, 6, 2.0)
    model = build_local_model(CONFIG, placement, 1, buffers, slots_capacity=5)
    weights = model.expert_weights()
    assert [tuple(t.shape) for t in weights[0]] == [(5, 8, 8), (5, 8, 4)]
    for layer in range(2):
        w13, w2 = weights[layer]
        for slot, expert in enumerate([4, 5, 5]):
            assert torch.equal(w13[slot], seeded_expert(CONFIG, layer, expert)[0])
            assert torch.equal(w2[slot], seeded_expert(CONFIG, layer, expert)[1])
        assert int(w13[3:].abs().sum()) == 0  # the empty slot and spare capacity
    w13_bf16 = build_local_model(CONFIG, placement, 1, buffers, dtype=torch.bfloat16).reload(1, 2)[
        0
    ]
    assert w13_bf16.dtype == torch.bfloat16
    assert torch.equal(w13_bf16, seeded_expert(CONFIG, 1, 2)[0].bfloat16())
    model.load_expert_(1, 3, 2)
    assert torch.equal(model.expert_weights()[1][0][3], seeded_expert(CONFIG, 1, 2)[0])
    with pytest.raises(ValueError, match="rank must be in"):
        build_local_model(CONFIG, placement, 2, buffers)
    with pytest.raises(ValueError, match="slots_capacity"):
        build_local_model(CONFIG, placement, 0, buffers, slots_capacity=3)
    with pytest.raises(ValueError, match="placement is 2 layers x 6 experts, config 3"):
        build_local_model(MoEModelConfig(num_layers=3, num_experts=6), placement, 0, buffers)


@pytest.fixture
def solo_group() -> Iterator[StatelessGroup]:
    """A real one-rank gloo group in this process."""
    rdzv = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=10)
    group = StatelessGroup(rdzv, "solo", 0, 0, 1, timeout_s=10)
    yield group
    group.destroy()
    rdzv.close()


def test_layer_argument_and_state_checks(solo_group: StatelessGroup) -> None:
    placement = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 5, -1]] * 2), 6, 2)
    buffers = PlacementBuffers(2, 6, 2.0)
    model = build_local_model(CONFIG, placement, 0, buffers)
    layer = model.layers[0]
    assert isinstance(layer, EPMoELayer)
    with pytest.raises(RuntimeError, match="no dispatch backend"):
        model(torch.randn(2, 8))
    with pytest.raises(ValueError, match="5 slots per rank but this layer holds weights for 4"):
        layer.set_backend(AllToAllBackend(solo_group, 5))
    layer.set_backend(AllToAllBackend(solo_group, 4))
    with pytest.raises(RuntimeError, match="placement has 0 slots per layer"):
        layer(torch.randn(2, 8))  # buffers never written
    gate, w13, w2 = layer.gate_weight, layer.w13, layer.w2
    with pytest.raises(ValueError, match="layer must be in"):
        EPMoELayer(2, gate, w13, w2, 2, buffers)
    with pytest.raises(ValueError, match="w13 must be"):
        EPMoELayer(0, gate, w13[:, :7], w2, 2, buffers)
    with pytest.raises(ValueError, match="w2 must be"):
        EPMoELayer(0, gate, w13, w2[:3], 2, buffers)
    with pytest.raises(ValueError, match="gate_weight has 5 experts"):
        EPMoELayer(0, gate[:5], w13, w2, 2, buffers)
    with pytest.raises(ValueError, match="load_record capacity"):
        EPMoELayer(0, gate, w13, w2, 2, buffers, load_record=LoadRecord(2, 6, 99, 4))
    with pytest.raises(ValueError, match="slots_per_rank"):
        AllToAllBackend(solo_group, 0)


def test_dispatch_resource_builds_per_epoch(solo_group: StatelessGroup) -> None:
    placement = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 5, -1]] * 2), 6, 2)
    resources = EpochResources()
    register_dispatch_backend(resources)
    one_rank = Placement(placement.phy2log, 6, 1)
    built = resources.build(EpochContext(3, 0, 1, solo_group, one_rank))
    backend = built[DISPATCH_RESOURCE]
    assert (backend.rank, backend.world_size, backend.slots_per_rank) == (0, 1, 8)
    built.teardown()
    with pytest.raises(RuntimeError, match="destroyed"):
        _ = backend.group
    with pytest.raises(ResourceError, match="has no placement"):
        resources.build(EpochContext(4, 0, 1, solo_group))
    with pytest.raises(ResourceError, match="context says rank 0 of 2"):
        resources.build(EpochContext(4, 0, 2, solo_group, placement))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31))
def test_received_rows_regroup_slot_major(ranks: int, per_rank: int, seed: int) -> None:
    """The all-to-all backend's regrouping is a permutation that puts the rows received in
    (source rank, local slot) order into slot-major order, keeping source order inside a slot."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (ranks, per_rank), generator=gen)
    labels = [
        (r, s) for r in range(ranks) for s in range(per_rank) for _ in range(int(counts[r, s]))
    ]
    position = _grouped_position(counts)
    assert sorted(position.tolist()) == list(range(len(labels)))
    grouped: list[tuple[int, int]] = [(0, 0)] * len(labels)
    for row, pos in enumerate(position.tolist()):
        grouped[pos] = labels[row]
    assert grouped == sorted(labels, key=lambda rs: (rs[1], rs[0]))
