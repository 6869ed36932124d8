"""One rank of the demo: an elastic EP MoE engine serving skewed synthetic requests.

The coordinator's launcher starts :func:`rank_main` in a process (initial ranks and joiners).
The serving loop, every iteration::

    action = agent.poll()              # the scaling package's safe point (may commit an epoch)
    step():  agree                     # one SUM all-reduce on the gloo control group: rank 0's
                                       #   newest demo command + the load window of every rank
             run the command, if new   # a probe (the check), on every rank at once
             serve                     # one forward step of the admitted requests

A ``PeerFailure`` (or ``GroupClosedError``: the agent's watcher aborts an NCCL world whose member
the coordinator marked dead) anywhere in ``step`` recovers (the agent shrinks to the survivors)
and redoes the whole step, so every survivor's next collective is the same one wherever it saw
the failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.distributed import AllreduceOptions, ReduceOp, TCPStore

from elastic_ep.demo.config import DemoConfig
from elastic_ep.demo.frontend import FrontEnd, Request
from elastic_ep.demo.messages import DemoChannel, DemoCommand, ProbeReply
from elastic_ep.demo.traffic import SkewedTokens, probe_batch, probe_slice
from elastic_ep.eplb import Placement, PlacementBuffers, plan
from elastic_ep.errors import PeerFailure, ReconfigureError
from elastic_ep.groups import GroupClosedError
from elastic_ep.moe import (
    DISPATCH_RESOURCE,
    LoadRecord,
    build_local_model,
    register_dispatch_backend,
)
from elastic_ep.scaling import (
    Action,
    ElasticRank,
    EpochResources,
    RankRole,
    RankSpec,
    TrafficGate,
)

COUNTS_EVERY_S = 0.25
"""How often a rank publishes its request counters (besides every check and its exit)."""
KV_BYTES = 8 << 30
"""The free KV-cache bytes a rank claims (member ``m`` claims ``m`` MiB less: the MIN shows)."""


@dataclass(frozen=True)
class RankConfig:
    """What a launched rank gets as ``RankSpec.config``: the demo's settings and its device."""

    demo: DemoConfig
    device: str


def initial_placement(config: DemoConfig, world_size: int) -> Placement:
    """The starting placement: planned for uniform load (no traffic has been seen yet)."""
    model = config.model
    uniform = torch.ones(model.num_layers, model.num_experts, dtype=torch.float64)
    return plan(uniform, world_size, config.slots)


def rank_main(spec: RankSpec) -> None:
    """Entry point of a rank process (module level: the launcher pickles it by reference)."""
    server = RankServer.start(spec)
    if server is not None:
        server.run()


class RankServer:
    """The serving loop of one rank (see the module docstring)."""

    def __init__(self, spec: RankSpec, config: DemoConfig, device: torch.device) -> None:
        self.config = config
        self.member = spec.member_id
        self.device = device
        model_cfg = config.model
        self._store = TCPStore(
            spec.store_host,
            spec.store_port,
            is_master=False,
            timeout=timedelta(seconds=config.timeout_s),
            wait_for_workers=False,
        )
        self.channel = DemoChannel(self._store, config.timeout_s)
        # Commands published before this rank existed were run without it.
        self.seen = self.channel.latest_seq()
        layers, experts = model_cfg.num_layers, model_cfg.num_experts
        self.buffers = PlacementBuffers(layers, experts, config.max_physical_factor, device=device)
        self.record = LoadRecord(
            layers, experts, self.buffers.capacity, config.window, device=device
        )
        joiner = spec.role is RankRole.JOINER
        placement = None if joiner else initial_placement(config, len(spec.members))
        self.model = build_local_model(
            model_cfg,
            placement or Placement.empty(layers, experts, 1, config.slots),
            0 if joiner else spec.rank,
            self.buffers,
            load_record=self.record,
            device=device,
        )
        self.resources = EpochResources()
        register_dispatch_backend(self.resources)
        self.global_load = torch.zeros(layers, experts, dtype=torch.float64)
        traffic = config.traffic
        self.gate = TrafficGate()
        self.frontend = FrontEnd(
            self.gate, traffic.requests_per_s, traffic.decode_steps, traffic.drain_wait_s
        )
        self.tokens = SkewedTokens(
            model_cfg, traffic.zipf_s, traffic.noise, traffic.bias, seed=self.member
        )
        self.probe = probe_batch(
            model_cfg, traffic.zipf_s, traffic.noise, traffic.bias, config.probe_tokens
        )
        self.active: list[Request] = []
        self._counts_at = 0.0
        self._last_step = 0.0
        self.agent = ElasticRank(
            spec,
            weights=self.model.expert_weights(),
            load=lambda: self.global_load,
            placement=placement,
            kv_bytes=lambda: KV_BYTES - (self.member << 20),
            reload=self.model.reload,
            resources=self.resources,
            gate=self.gate,
            buffers=self.buffers,
            backend=config.backend,
            device=device,
            timeout_s=config.timeout_s,
        )
        self._bind_backend()

    @classmethod
    def start(cls, spec: RankSpec) -> RankServer | None:
        """Build the rank; ``None`` for a joiner whose scale rolled back before it joined."""
        rank_config = spec.config
        if not isinstance(rank_config, RankConfig):
            raise TypeError(
                f"RankSpec.config must be a RankConfig, got {type(rank_config).__name__}"
            )
        device = torch.device(rank_config.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            return cls(spec, rank_config.demo, device)
        except ReconfigureError:
            return None

    # ---- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        self.frontend.start()
        try:
            while True:
                action = self.agent.poll()
                if action in (Action.LEAVE, Action.STOP):
                    return
                if action in (Action.COMMITTED, Action.RECOVERED):
                    self._bind_backend()
                self._step()
        finally:
            self.frontend.stop()
            self.frontend.drop_all(self.active)
            self.active = []
            self.channel.report_counts(self.member, self.frontend.counts())
            self.agent.close()

    def _bind_backend(self) -> None:
        self.model.set_backend(self.resources.get(DISPATCH_RESOURCE))

    def _step(self) -> None:
        while True:
            try:
                command = self._agree()
                if command is not None:
                    self._probe(command.seq)
                self._serve()
                return
            except (PeerFailure, GroupClosedError) as failure:
                self.agent.recover(failure)
                self._bind_backend()

    def _agree(self) -> DemoCommand | None:
        """One collective: the newest command (rank 0's view) and the load summed over ranks."""
        window = self.record.window.sum(0, dtype=torch.int64).flatten().cpu()
        flags = torch.zeros(1 + window.numel(), dtype=torch.int64)
        if self.agent.rank == 0:
            flags[0] = self.channel.latest_seq()
        flags[1:] = window
        control = self.agent.control
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp(ReduceOp.SUM)
        # agent.wait fails fast once the coordinator marks a member dead (a ring all-reduce
        # leaves the dead rank's non-neighbours waiting for the timeout otherwise)
        self.agent.wait(control.process_group.allreduce([flags], opts), control)
        self.global_load = flags[1:].view_as(self.global_load).to(torch.float64)
        newest = int(flags[0])
        if newest <= self.seen:
            return None
        self.seen = newest
        return self.channel.command(newest)

    def _probe(self, seq: int) -> None:
        agent = self.agent
        rows = probe_slice(self.config.probe_tokens, agent.rank, agent.world_size)
        output = self.model(self.probe[rows].to(self.device)).float().cpu()
        first = agent.rank == 0
        counts = self.frontend.counts()
        self.channel.report_counts(self.member, counts)
        self.channel.reply(
            seq,
            self.member,
            ProbeReply(
                member=self.member,
                rank=agent.rank,
                world_size=agent.world_size,
                epoch=agent.epoch,
                output=output,
                phy2log=agent.placement.phy2log.clone() if first else None,
                load=self.global_load.clone() if first else None,
                counts=counts,
            ),
        )

    def _serve(self) -> None:
        traffic = self.config.traffic
        self.active += self.frontend.take(traffic.max_active - len(self.active))
        num_tokens = len(self.active) * traffic.tokens_per_step
        hidden = self.tokens.sample(num_tokens).to(self.device)
        self.model(hidden)
        self.record.end_step()
        self.frontend.ran(num_tokens)
        for request in self.active:
            request.remaining_steps -= 1
            if request.remaining_steps == 0:
                self.frontend.finish(request)
        self.active = [r for r in self.active if r.remaining_steps > 0]
        now = time.monotonic()
        if now - self._counts_at > COUNTS_EVERY_S:
            self._counts_at = now
            self.channel.report_counts(self.member, self.frontend.counts())
        pause = self._last_step + traffic.step_interval_s - now
        if pause > 0:
            time.sleep(pause)
        self._last_step = time.monotonic()
