"""A complete small elastic MoE engine: the rank loop, its coordinator and control endpoint.

    python examples/custom_engine.py        # CPU, gloo over loopback; about 15 s on 2 cores

Each rank holds its share of a seeded MoE model (``elastic_ep.moe``) and serves requests of a
few forward steps each. It gives :class:`ElasticRank` its expert ``weights`` (rewritten in place
at commits), its ``load`` (what the planner balances), its free ``kv_bytes`` (the world agrees on
the minimum), a ``reload`` hook (for experts whose every replica died), its traffic ``gate``
(closed while a scale runs) and its epoch-bound ``resources`` (the all-to-all).

The controller starts 2 ranks, scales to 4 over HTTP, back to 3 through the Python API,
rebalances, then kills a rank: the 2 survivors recover, reloading the experts only it held.
After every change of epoch each rank checks its forward against the single-process reference.
"""

from __future__ import annotations

import json
import time
import urllib.request

import torch

from elastic_ep import (
    Action,
    ControlServer,
    ElasticCoordinator,
    ElasticRank,
    EpochResources,
    EventKind,
    GateMode,
    GroupClosedError,
    LocalProcessLauncher,
    PeerFailure,
    Placement,
    PlacementBuffers,
    RankRole,
    RankSpec,
    RebalanceRequest,
    ReconfigureError,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
    ScalingInProgress,
    TrafficGate,
    kv_blocks_for_budget,
    plan,
    sync_kv_budget,
)
from elastic_ep.demo.traffic import SkewedTokens
from elastic_ep.moe import (
    DISPATCH_RESOURCE,
    EPMoEModel,
    LoadRecord,
    MoEModelConfig,
    build_local_model,
    reference_forward,
    register_dispatch_backend,
)

MODEL = MoEModelConfig(num_layers=2, num_experts=8, hidden_size=32, intermediate_size=16)
SLOTS = 4  # expert slots per rank: 2 ranks hold every expert once
MAX_SLOTS = 16  # the routing tables' capacity: at most 4 ranks
TOKENS_PER_REQUEST, REQUEST_STEPS = 4, 5  # a request: 4 tokens for 5 forward steps
KV_BLOCK_BYTES, KV_BLOCKS_PER_REQUEST = 1 << 20, 64


def forward_step(
    agent: ElasticRank, model: EPMoEModel, record: LoadRecord, hidden: torch.Tensor, check: bool
) -> torch.Tensor:
    """One forward of this rank's tokens; returns the window's load summed over the ranks [L, E]."""
    out = model(hidden)  # dispatch / combine over agent.world: every rank calls it, T may be 0
    if check:  # the placement changed: compare with every expert held locally
        torch.testing.assert_close(out, reference_forward(MODEL, hidden), atol=1e-4, rtol=1e-4)
    total = record.window.sum(0, dtype=torch.int64)  # [L, E] this rank's recent tokens
    # agent.wait: fails fast when the coordinator marks a rank dead, not at the group timeout
    agent.wait(agent.control.process_group.allreduce([total]), agent.control)
    record.end_step()
    return total.double()


def rank_main(spec: RankSpec) -> None:
    """One rank process (started by the coordinator's launcher, for the job and every joiner)."""
    layers, experts = MODEL.num_layers, MODEL.num_experts
    buffers = PlacementBuffers(layers, experts, MAX_SLOTS / experts)  # fixed-address tables
    record = LoadRecord(layers, experts, buffers.capacity, window=32)
    joiner = spec.role is RankRole.JOINER
    # the job starts from a placement for uniform load; a joiner's slots start empty
    placement = None if joiner else plan(torch.ones(layers, experts), len(spec.members), SLOTS)
    initial = placement or Placement.empty(layers, experts, len(spec.members), SLOTS)
    model = build_local_model(MODEL, initial, spec.rank, buffers, load_record=record)
    resources = EpochResources()
    register_dispatch_backend(resources)  # an all-to-all on each epoch's world group
    gate = TrafficGate()
    free_kv = (1024 - spec.member_id) * KV_BLOCK_BYTES  # a real engine measures free memory
    load = torch.zeros(layers, experts, dtype=torch.float64)  # summed over the ranks, per step
    try:
        agent = ElasticRank(
            spec,
            weights=model.expert_weights(),
            load=lambda: load,
            placement=placement,
            kv_bytes=lambda: free_kv,
            reload=model.reload,
            resources=resources,
            gate=gate,
            buffers=buffers,
            timeout_s=spec.timeout_s,
        )
    except ReconfigureError:
        return  # the scale this joiner was started for rolled back
    model.set_backend(resources.get(DISPATCH_RESOURCE))
    budget = agent.kv_budget_bytes if joiner else sync_kv_budget(agent.world, free_kv)
    tokens = SkewedTokens(MODEL, zipf_s=1.2, noise=0.25, bias=0.75, seed=spec.member_id)
    requests: list[int] = []  # forward steps left of each admitted request
    check = True
    while True:
        action = agent.poll()  # the safe point: a scale may commit here, on every rank at once
        if action in (Action.LEAVE, Action.STOP):
            break
        if action is not Action.SERVE:  # COMMITTED / ROLLED_BACK / RECOVERED
            model.set_backend(resources.get(DISPATCH_RESOURCE))
            budget, check = agent.kv_budget_bytes or budget, True
        if len(requests) < kv_blocks_for_budget(budget, KV_BLOCK_BYTES) // KV_BLOCKS_PER_REQUEST:
            try:
                gate.enter()  # closed while a scale runs (drain: it waits for those in flight)
                requests.append(REQUEST_STEPS)
            except ScalingInProgress:
                pass  # a real front end answers "retry in a moment"
        hidden = tokens.sample(len(requests) * TOKENS_PER_REQUEST)
        while True:
            try:
                load = forward_step(agent, model, record, hidden, check)
                break
            except (PeerFailure, GroupClosedError) as failure:  # a rank died mid-step
                agent.recover(failure)  # shrink to the survivors, then redo the step
                model.set_backend(resources.get(DISPATCH_RESOURCE))
                check = True
        check = False
        for _ in range(requests.count(1)):
            gate.leave()  # these requests end with this step
        requests = [steps - 1 for steps in requests if steps > 1]
        time.sleep(0.005)
    agent.close()


def http(url: str, body: dict | None = None) -> dict:
    """GET ``url``, or POST ``body`` as JSON to it; the JSON reply."""
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data), timeout=10) as reply:
        return json.loads(reply.read())


def show(what: str, status: ScaleStatus) -> ScaleStatus:
    """Print one line about a finished event; stop unless it completed."""
    if status.phase not in (ScalePhase.COMPLETED, ScalePhase.IDLE):
        raise SystemExit(f"{what}: {status.phase.value}: {status.error}")
    keys = ("members", "epoch", "blocking_s", "balance_after", "kv_budget_bytes", "lost_experts")
    info = {k: v for k, v in status.to_json().items() if k in keys}
    print(f"{what:<22}", {k: round(v, 3) if isinstance(v, float) else v for k, v in info.items()})
    return status


def recovered(coord: ElasticCoordinator, timeout_s: float) -> ScaleStatus:
    """The status once the survivors of a dead rank serve again (bounded wait)."""
    for _ in range(int(timeout_s / 0.05)):
        status = coord.status()
        if status.event is EventKind.RECOVERY and status.phase is ScalePhase.COMPLETED:
            break
        time.sleep(0.05)
    return status


def main() -> None:
    limits = ScaleLimits(MODEL.num_experts, SLOTS, MAX_SLOTS)  # world sizes the model runs at
    coord = ElasticCoordinator(LocalProcessLauncher(rank_main), limits, timeout_s=10.0)
    try:
        show("started", coord.start(world_size=2))
        with ControlServer(coord) as server:  # POST /scale, POST /rebalance, GET /status
            http(server.url + "/scale", {"world_size": 4, "mode": "drain", "timeout_s": 30})
            show("scaled up over HTTP", coord.wait(60))
            print(f"GET /status: {http(server.url + '/status')['world_size']} ranks")
        down = ScaleRequest(world_size=3, mode=GateMode.REJECT, timeout_s=30)
        show("scaled down", coord.scale(down))
        show("rebalanced", coord.rebalance(RebalanceRequest(timeout_s=30)))
        coord.handle(coord.status().members[1]).kill()
        final = show("rank killed, recovered", recovered(coord, 30))
        ranks = [coord.handle(member) for member in final.members]
    finally:
        coord.shutdown()
    codes = [rank.exitcode for rank in ranks]  # each rank checked its forward after every event
    if codes != [0] * len(ranks):
        raise SystemExit(f"rank exit codes {codes}")
    print(f"custom_engine: OK ({len(ranks)} ranks serving after 2 -> 4 -> 3 -> rebalance -> kill)")


if __name__ == "__main__":
    main()
