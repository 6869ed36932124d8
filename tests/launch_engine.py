"""A tiny engine for ``elastic-ep launch --entry tests.launch_engine:rank_main`` (gloo, CPU).

Each expert's weight is a row filled with its id, so a rank can check its slots after every
commit; the "forward step" is one all-reduce on the serving world. ``spec.config`` may give
``layers``, ``experts`` and ``slots``.
"""

from __future__ import annotations

import os
import time

import torch

from elastic_ep.eplb import Placement
from elastic_ep.eplb.planner import plan
from elastic_ep.errors import ReconfigureError
from elastic_ep.scaling import Action, ElasticRank, RankRole, RankSpec

WIDTH = 4


def _weights(placement: Placement | None, rank: int, layers: int, slots: int) -> list:
    weights = [[torch.full((slots, WIDTH), -1.0)] for _ in range(layers)]
    if placement is not None:
        for layer, local in enumerate(placement.local_slots(rank).tolist()):
            for slot, expert in enumerate(local):
                weights[layer][0][slot] = float(expert)
    return weights


def _check(agent: ElasticRank) -> None:
    for layer, local in enumerate(agent.placement.local_slots(agent.rank).tolist()):
        for slot, expert in enumerate(local):
            if expert >= 0 and not bool((agent.weights[layer][0][slot] == expert).all()):
                raise AssertionError(f"layer {layer} slot {slot} does not hold expert {expert}")


def rank_main(spec: RankSpec) -> None:
    cfg = spec.config or {}
    layers, experts, slots = cfg.get("layers", 2), cfg.get("experts", 4), cfg.get("slots", 2)
    assert os.environ["ELASTIC_EP_BACKEND"] == "gloo" and os.environ["ELASTIC_EP_DEVICE"] == "cpu"
    load = torch.arange(1, experts + 1, dtype=torch.float64).expand(layers, -1).clone()
    placement = None if spec.role is RankRole.JOINER else plan(load, len(spec.members), slots)
    try:
        agent = ElasticRank(
            spec,
            weights=_weights(placement, 0 if placement is None else spec.rank, layers, slots),
            load=lambda: load,
            placement=placement,
            kv_bytes=lambda: 1 << 20,
            reload=lambda layer, expert: [torch.full((WIDTH,), float(expert))],
            timeout_s=spec.timeout_s,
        )
    except ReconfigureError:
        return  # the scale this joiner was started for rolled back
    while True:
        action = agent.poll()
        if action in (Action.LEAVE, Action.STOP):
            agent.close()
            return
        if action is not Action.SERVE:
            _check(agent)
        token = torch.ones(1)
        agent.world.all_reduce(token)
        if int(token) != agent.world_size:
            raise AssertionError(f"forward gave {int(token)} on a world of {agent.world_size}")
        time.sleep(0.005)


def crash_main(spec: RankSpec) -> None:
    """An engine that fails as it starts (the launcher must exit with one line, not hang)."""
    raise RuntimeError(f"engine of member {spec.member_id} failed to load its model")
