"""A toy elastic engine for fault tests: real ranks, real collectives, bit-exact weight checks.

Each rank runs :func:`rank_main`: an :class:`~elastic_ep.scaling.ElasticRank` serving a loop of
"forward steps" (one all-reduce on the epoch's world group; a ``PeerFailure`` there starts a
recovery and the step is redone). Expert weights are a function of ``(layer, expert, kind)``
(:func:`expert_weight`), so after every event (start, commit, rollback, recovery) a rank checks
each of its slots bit for bit and publishes the result under ``toy/verify/<epoch>/<member>``
(JSON: event, error, world size, rank). :func:`check_weights` reads them for a status.

Fault hooks (in :class:`ToyConfig`, per member id) widen race windows or kill at a chosen point:
a slow start-up, a slow teardown of the old epoch's resources after a commit, a SIGKILL when the
KV budget is asked for (inside a scale), a SIGKILL in the recovery's planner. A rank whose
recovery fails (``ReconfigureError``) writes the error under ``toy/exit/<member>`` and exits with
code 3.

Started by :class:`~elastic_ep.scaling.LocalProcessLauncher` (``rank_main``) or, torchrun style,
by :class:`~elastic_ep.scaling.CommandLauncher` (``python -m elastic_ep.testing.toy_engine``).
With ``hosts > 0`` member ``m`` lives on host ``m % hosts`` and the planner keeps expert groups
inside one host (hierarchical placement, hosts as nodes) whenever the ranks form equal blocks
per host.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch.distributed import Store, TCPStore

from elastic_ep.eplb import Placement
from elastic_ep.eplb.planner import plan
from elastic_ep.errors import PeerFailure, ReconfigureError
from elastic_ep.groups import GroupClosedError
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling import (
    Action,
    ElasticRank,
    EpochResources,
    RankRole,
    RankSpec,
    ScaleStatus,
)
from elastic_ep.scaling.channel import ControlChannel, put

KINDS = ((3,), (2, 2))  # per slot: a w13-like [3] and a w2-like [2, 2] tensor
EXIT_UNRECOVERABLE = 3


@dataclass(frozen=True)
class ToyConfig:
    """The toy engine's settings and fault hooks (picklable; passed in ``RankSpec.config``).

    Attributes:
        layers / experts / slots: model shape; ``slots`` expert slots per rank.
        num_groups: expert groups (hierarchical placement keeps a group inside one host).
        hosts: number of hosts (0: no hierarchy); member ``m`` is on host ``m % hosts``.
        step_s: sleep between forward steps.
        start_delay: ``{member: seconds}``: that member sleeps this long before it enters the
            job (a slow start-up: a cold interpreter, an engine loading its model).
        slow_teardown: ``{member: seconds}``: that member's old-epoch resources take this long
            to tear down after a commit (it writes ``toy/tearing/<member>`` first).
        kill_at_kv: members that SIGKILL themselves when a scale asks for their KV bytes.
        kill_in_recovery_plan: members that SIGKILL themselves when planning a recovery.
        progress_dir: if set, every rank writes its forward-step count to
            ``<progress_dir>/<member>`` every 20 steps (a file, not the store: it shows a rank
            serving after the coordinator and its store are gone).
    """

    layers: int = 2
    experts: int = 8
    slots: int = 4
    num_groups: int = 1
    hosts: int = 0
    step_s: float = 0.005
    start_delay: dict[int, float] = field(default_factory=dict)
    slow_teardown: dict[int, float] = field(default_factory=dict)
    kill_at_kv: frozenset[int] = frozenset()
    kill_in_recovery_plan: frozenset[int] = frozenset()
    progress_dir: str = ""


def expert_weight(layer: int, expert: int, kind: int) -> torch.Tensor:
    """The weight tensor ``kind`` of ``expert`` in ``layer``: float32 of shape ``KINDS[kind]``."""
    shape = KINDS[kind]
    n = int(torch.tensor(shape).prod())
    base = layer * 10_000 + expert * 100 + kind * 10
    return (torch.arange(n, dtype=torch.float32) + base).reshape(shape)


def uniform_load(cfg: ToyConfig) -> torch.Tensor:
    """float64 ``[layers, experts]`` load, slightly skewed so plans are not all ties."""
    per_expert = torch.tensor([1.0 + 0.01 * e for e in range(cfg.experts)], dtype=torch.float64)
    return per_expert.expand(cfg.layers, -1).clone()


def num_nodes(cfg: ToyConfig, members: tuple[int, ...]) -> int:
    """Hosts as nodes when the ranks (``members``, in rank order) form one equal consecutive
    block per host, else 1."""
    if cfg.hosts <= 1 or len(members) % cfg.hosts or cfg.num_groups % cfg.hosts:
        return 1
    block = len(members) // cfg.hosts
    hosts = [m % cfg.hosts for m in members]
    blocks = [set(hosts[i : i + block]) for i in range(0, len(hosts), block)]
    ok = all(len(b) == 1 for b in blocks) and len({next(iter(b)) for b in blocks}) == cfg.hosts
    return cfg.hosts if ok else 1


def slot_weights(
    layers: int,
    slots: int,
    placement: Placement | None,
    rank: int,
    device: torch.device | None = None,
) -> list[list[torch.Tensor]]:
    """A rank's expert weights: per layer, one float32 [slots, *shape] tensor per ``KINDS``
    shape, slot ``s`` holding ``expert_weight`` of its expert (NaN: empty, or no placement yet)."""
    out = []
    for layer in range(layers):
        tensors = [torch.full((slots, *shape), float("nan"), device=device) for shape in KINDS]
        if placement is not None:
            for slot, expert in enumerate(placement.local_slots(rank)[layer].tolist()):
                for kind, t in enumerate(tensors):
                    t[slot] = expert_weight(layer, expert, kind)
        out.append(tensors)
    return out


def wrong_weight(agent: ElasticRank) -> str | None:
    """The first slot of ``agent`` whose weights are not its expert's, or ``None``."""
    local = agent.placement.local_slots(agent.rank)
    for layer in range(local.shape[0]):
        for slot, expert in enumerate(local[layer].tolist()):
            if expert < 0:
                continue
            for kind, t in enumerate(agent.weights[layer]):
                if not torch.equal(t[slot].cpu(), expert_weight(layer, expert, kind)):
                    return (
                        f"layer {layer} slot {slot}: wrong weights for expert {expert} kind {kind}"
                    )
    return None


def _publish(agent: ElasticRank, event: str) -> None:
    info = {
        "event": event,
        "error": wrong_weight(agent),
        "world": agent.world_size,
        "rank": agent.rank,
    }
    put(agent._rdzv.store, f"toy/verify/{agent.epoch}/{agent.member}", json.dumps(info).encode())


def _forward(agent: ElasticRank, cfg: ToyConfig) -> None:
    """One forward step on the serving world group; recover and redo it after a failure."""
    while True:
        token = torch.ones(1)
        try:
            agent.wait(agent.world.process_group.allreduce([token]), agent.world)
        except (PeerFailure, GroupClosedError) as failure:
            agent.recover(failure)
            _publish(agent, Action.RECOVERED.value)
            continue
        if int(token) != agent.world_size:
            raise AssertionError(f"forward all_reduce gave {int(token)}, world {agent.world_size}")
        return


def _client(spec: RankSpec) -> Store:
    return TCPStore(
        spec.store_host,
        spec.store_port,
        is_master=False,
        timeout=timedelta(seconds=spec.timeout_s),
        wait_for_workers=False,
    )


def rank_main(spec: RankSpec) -> None:
    """One rank of the toy engine (a launcher's entry point)."""
    cfg: ToyConfig = spec.config
    me = spec.member_id
    time.sleep(cfg.start_delay.get(me, 0.0))
    resources = EpochResources()

    def teardown(value: object) -> None:
        delay = cfg.slow_teardown.get(me, 0.0)
        if delay:
            put(_client(spec), f"toy/tearing/{me}", b"1")
            time.sleep(delay)

    resources.register("a2a", lambda ctx: (ctx.epoch, ctx.world_size), teardown=teardown)

    serving: list[ElasticRank] = []  # the agent, once built (the planner reads its members)

    def next_members(num_ranks: int, dead: tuple[int, ...]) -> tuple[int, ...]:
        """The new epoch's member ids in rank order: the survivors of a recovery, else the
        running command's (a scale or rebalance), else the serving ones (a recovery in which
        every member survived)."""
        current = serving[0].members
        if dead:
            return tuple(m for r, m in enumerate(current) if r not in dead)
        channel = ControlChannel(_client(spec), spec.timeout_s)
        commanded = channel.command(channel.latest_seq()).new_members
        return commanded if len(commanded) == num_ranks else current

    def planner(
        load: torch.Tensor,
        num_ranks: int,
        slots_per_rank: int,
        *,
        previous: Placement | None = None,
        rank_mapping: RankMapping | None = None,
        dead_ranks: Sequence[int] = (),
    ) -> Placement:
        dead = tuple(dead_ranks)
        if dead and me in cfg.kill_in_recovery_plan:
            os.kill(os.getpid(), signal.SIGKILL)
        members = (
            next_members(num_ranks, dead) if cfg.hosts > 1 and serving else tuple(range(num_ranks))
        )
        return plan(
            load,
            num_ranks,
            slots_per_rank,
            num_groups=cfg.num_groups,
            num_nodes=num_nodes(cfg, members),
            previous=previous,
            rank_mapping=rank_mapping,
            dead_ranks=dead,
        )

    def kv_bytes() -> int:
        if me in cfg.kill_at_kv:
            os.kill(os.getpid(), signal.SIGKILL)
        return 1_000_000

    joiner = spec.role is RankRole.JOINER
    placement = None
    if not joiner:
        placement = plan(
            uniform_load(cfg),
            len(spec.members),
            cfg.slots,
            num_groups=cfg.num_groups,
            num_nodes=num_nodes(cfg, spec.members),
        )
    try:
        agent = ElasticRank(
            spec,
            weights=slot_weights(cfg.layers, cfg.slots, placement, 0 if joiner else spec.rank),
            load=lambda: uniform_load(cfg),
            placement=placement,
            kv_bytes=kv_bytes,
            reload=lambda layer, expert: [expert_weight(layer, expert, k) for k in range(2)],
            resources=resources,
            planner=planner,
            timeout_s=spec.timeout_s,
        )
    except ReconfigureError:
        return  # the scale this joiner was launched for rolled back
    serving.append(agent)
    _publish(agent, "start")
    steps = 0
    try:
        while True:
            steps += 1
            if cfg.progress_dir and steps % 20 == 0:
                _write_progress(cfg.progress_dir, me, steps)
            action = agent.poll()
            if action in (Action.LEAVE, Action.STOP):
                agent.close()
                return
            if action is not Action.SERVE:
                _publish(agent, action.value)
            _forward(agent, cfg)
            time.sleep(cfg.step_s)
    except ReconfigureError as err:
        put(_client(spec), f"toy/exit/{me}", str(err).encode())
        sys.stdout.flush()
        os._exit(EXIT_UNRECOVERABLE)


def _write_progress(directory: str, member: int, steps: int) -> None:
    path = os.path.join(directory, str(member))
    with open(path + ".tmp", "w") as f:
        f.write(str(steps))
    os.replace(path + ".tmp", path)  # a reader never sees a partial file


def read_progress(directory: str) -> dict[int, int]:
    """``{member: forward steps}`` written by ranks with ``progress_dir`` set."""
    out = {}
    for name in os.listdir(directory):
        if name.isdigit():
            with open(os.path.join(directory, name)) as f:
                out[int(name)] = int(f.read() or 0)
    return out


def check_weights(store: Store, status: ScaleStatus, timeout_s: float) -> str | None:
    """Wait (bounded) for every serving member's self-check of ``status.epoch``; return the
    first problem (a wrong weight, a wrong rank or world size, a missing check), else ``None``."""
    keys = [f"toy/verify/{status.epoch}/{m}" for m in status.members]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except RuntimeError:
        missing = [m for m, k in zip(status.members, keys, strict=True) if not store.check([k])]
        return f"no weight check from members {missing} for epoch {status.epoch}"
    for rank, (m, key) in enumerate(zip(status.members, keys, strict=True)):
        info = json.loads(store.get(key))
        if info["error"] is not None:
            return f"member {m}: {info['error']}"
        if (info["rank"], info["world"]) != (rank, status.world_size):
            return f"member {m}: rank {info['rank']} of {info['world']}, expected {rank}"
    return None


if __name__ == "__main__":
    rank_main(RankSpec.from_env())
