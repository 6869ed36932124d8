"""The demo's controller: start the ranks, play the script, check after every event.

It hosts the job (an :class:`~elastic_ep.scaling.ElasticCoordinator` with a launcher of demo
ranks), lets traffic run between events so the load record fills, and after every event sends a
probe: every rank runs its rows of a fixed batch through the distributed model, and the
controller compares the whole output with :func:`~elastic_ep.moe.reference_forward` computed here,
in one process, with every expert local.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from elastic_ep.demo.config import DemoConfig, DemoEvent, EventKind
from elastic_ep.demo.devices import DeviceLauncher
from elastic_ep.demo.frontend import RequestCounts
from elastic_ep.demo.messages import CommandKind, DemoChannel
from elastic_ep.demo.timeline import Requests, TimelineRow, format_timeline
from elastic_ep.demo.traffic import probe_batch
from elastic_ep.eplb import Placement
from elastic_ep.errors import ElasticEPError
from elastic_ep.moe import reference_forward
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling import (
    ElasticCoordinator,
    RebalanceRequest,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
)
from elastic_ep.scaling.status import EventKind as StatusEvent

PROGRESS_EVERY_S = 2.0
"""A long phase prints a line this often."""
POLL_S = 0.01


@dataclass(frozen=True)
class DemoResult:
    """The timeline of a run; it passed when every check did."""

    rows: tuple[TimelineRow, ...]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def summary(self) -> str:
        """The final line: ``all N checks passed`` or which failed."""
        failed = [f"#{i} {row.event}" for i, row in enumerate(self.rows) if not row.passed]
        if not failed:
            return f"all {len(self.rows)} checks passed"
        return f"{len(failed)} of {len(self.rows)} checks failed: {', '.join(failed)}"


@dataclass(frozen=True)
class _Check:
    max_abs_diff: float
    placement: Placement
    load: torch.Tensor  # float64 [L, E]


class DemoController:
    """Runs one :class:`DemoConfig`; ``out`` receives every line it prints."""

    def __init__(self, config: DemoConfig, out: Callable[[str], None] = print) -> None:
        self.config = config
        self.out = out
        model = config.model
        self._expert_bytes = 3 * model.hidden_size * model.intermediate_size * 4  # fp32 w13 + w2
        traffic = config.traffic
        probe = probe_batch(model, traffic.zipf_s, traffic.noise, traffic.bias, config.probe_tokens)
        self._reference = reference_forward(model, probe)
        self._coord = ElasticCoordinator(
            DeviceLauncher(config), config.limits, config=config, timeout_s=config.timeout_s
        )
        self._channel = DemoChannel(self._coord.store, config.timeout_s)
        self._counts: dict[int, RequestCounts] = {}
        self._total = RequestCounts()
        self._placement: Placement | None = None

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> DemoResult:
        """Start, play every event, shut down; never raises for a failed event (see the rows).

        A rolled-back scale is a failed row and the script goes on (the old epoch serves); an
        event or check that does not finish in time ends the script with an ``(aborted)`` row.
        """
        rows: list[TimelineRow] = []
        try:
            rows.append(self._start())
            for event in self.config.events:
                self._serve()
                row = self._play(event)
                rows.append(row)
                self.out(f"  -> {self._row_line(row)}")
        except ElasticEPError as exc:
            self.out(f"  !! {exc}")
            rows.append(self._failed_row("(aborted)", str(exc)))
        finally:
            self.out("  shutting down the ranks")
            self._coord.shutdown(timeout_s=self.config.timeout_s + 5)
        result = DemoResult(tuple(rows))
        self.out("")
        self.out(format_timeline(result.rows))
        self.out("")
        self.out(result.summary())
        return result

    def _start(self) -> TimelineRow:
        cfg = self.config
        where = f"{cfg.devices} GPUs, nccl" if cfg.backend == "nccl" else "CPU, gloo"
        self.out(
            f"starting {cfg.initial_ranks} rank processes ({where}): {cfg.model.num_layers} MoE "
            f"layers x {cfg.model.num_experts} experts, top-{cfg.model.top_k}, {cfg.slots} slots "
            f"per rank"
        )
        began = time.monotonic()
        status = self._coord.start(cfg.initial_ranks, timeout_s=cfg.start_timeout_s)
        self.out(
            f"  ranks up in {time.monotonic() - began:.2f} s; serving {cfg.serve_s:g} s of traffic"
        )
        self._serve()
        check = self._check(status)
        self._placement = check.placement
        self._say_load(check.load)
        return self._row("start", status.world_size, None, None, (), 0, 0, None, check)

    def _play(self, event: DemoEvent) -> TimelineRow:
        status = self._coord.status()
        if event.kind is EventKind.REBALANCE:
            return self._rebalance(status)
        if event.kind is EventKind.SCALE:
            return self._scale(status, event)
        return self._kill(status, event)

    # ---- events ----------------------------------------------------------------------------
    def _rebalance(self, status: ScaleStatus) -> TimelineRow:
        self.out(f"[rebalance] {status.world_size} ranks: re-plan for the recorded load")
        request = RebalanceRequest(timeout_s=self.config.scale_timeout_s)
        return self._request("rebalance", status, request)

    def _scale(self, status: ScaleStatus, event: DemoEvent) -> TimelineRow:
        assert event.value is not None
        label = f"scale {status.world_size}->{event.value} ({event.mode.value})"
        self.out(f"[{label}]")
        request = ScaleRequest(
            world_size=event.value, mode=event.mode, timeout_s=self.config.scale_timeout_s
        )
        return self._request(label, status, request)

    def _request(
        self, label: str, status: ScaleStatus, request: ScaleRequest | RebalanceRequest
    ) -> TimelineRow:
        """Submit a scale or rebalance to the coordinator, follow it, check the result."""
        began = time.monotonic()
        self._coord.submit(request)
        final = self._follow(
            label,
            began,
            lambda s: not s.phase.is_active,
            request.timeout_s + self.config.timeout_s + 30.0,
        )
        end_to_end = time.monotonic() - began
        previous = self._placement
        check = self._check(final)
        self._placement = check.placement
        ok = final.phase is ScalePhase.COMPLETED
        error = None if ok else f"{final.phase.value}: {final.error}"
        return self._event_row(label, status, final, end_to_end, previous, check, error=error)

    def _kill(self, status: ScaleStatus, event: DemoEvent) -> TimelineRow:
        assert event.value is not None
        victim = status.members[event.value]
        label = f"kill rank {event.value} (member {victim})"
        self.out(f"[{label}] SIGKILL; the survivors must notice and recover")
        began = time.monotonic()
        self._coord.handle(victim).kill()
        shown = status.phase  # the previous event's: print only what this one changes

        def recovered(s: ScaleStatus) -> bool:
            return (
                s.event is StatusEvent.RECOVERY
                and s.phase is ScalePhase.COMPLETED
                and victim not in s.members
            )

        final = self._follow(label, began, recovered, 2 * self.config.timeout_s + 30.0, shown)
        end_to_end = time.monotonic() - began
        self._book_lost(victim)
        previous = self._placement
        check = self._check(final)
        self._placement = check.placement
        ok = recovered(final)
        error = None if ok else f"no recovery: {final.phase.value} {final.error}"
        return self._event_row(
            label,
            status,
            final,
            end_to_end,
            previous,
            check,
            error=error,
            reloaded=final.lost_experts,
        )

    def _event_row(
        self,
        label: str,
        status: ScaleStatus,
        final: ScaleStatus,
        end_to_end: float,
        previous: Placement | None,
        check: _Check,
        *,
        error: str | None,
        reloaded: int = 0,
    ) -> TimelineRow:
        """The timeline row of a finished event; reloaded experts are not counted as moved."""
        moved = 0
        if error is None and previous is not None:
            mapping = RankMapping.from_members(status.members, final.members)
            moved = int(check.placement.transfers_from(previous, mapping).sum()) - reloaded
        planned = None
        if final.balance_before is not None and final.balance_after is not None:
            planned = (final.balance_before, final.balance_after)
        return self._row(
            label,
            final.world_size,
            end_to_end,
            final.blocking_s,
            tuple((p.value, s) for p, s in final.phase_s),
            moved,
            moved * self._expert_bytes,
            previous,
            check,
            reloaded=reloaded,
            error=error,
            planned=planned,
        )

    # ---- helpers ---------------------------------------------------------------------------
    def _serve(self) -> None:
        time.sleep(self.config.serve_s)

    def _follow(
        self,
        label: str,
        began: float,
        done: Callable[[ScaleStatus], bool],
        limit_s: float,
        shown: ScalePhase | None = None,
    ) -> ScaleStatus:
        """Wait (bounded) until ``done(status)``, printing each phase and a line per long wait."""
        said = began
        while True:
            status = self._coord.status()
            now = time.monotonic()
            if status.phase is not shown:
                shown, said = status.phase, now
                self.out(f"  {label}: {status.phase.value} at {now - began:.2f} s")
            elif now - said > PROGRESS_EVERY_S:
                said = now
                self.out(f"  {label}: still {status.phase.value} ({now - began:.1f} s)")
            if done(status):
                return status
            if now - began > limit_s:
                raise ElasticEPError(
                    f"{label}: not done within {limit_s:g} s (phase {status.phase.value})"
                )
            time.sleep(POLL_S)

    def _check(self, status: ScaleStatus) -> _Check:
        """Probe the serving ranks: max |distributed - reference|, the placement, the load."""
        cmd = self._channel.publish(CommandKind.PROBE)
        replies = self._channel.replies(cmd.seq, status.members, self.config.timeout_s + 20.0)
        ordered = sorted(replies.values(), key=lambda r: r.rank)
        output = torch.cat([r.output for r in ordered])
        diff = float((output - self._reference).abs().max())
        first = ordered[0]
        assert first.phy2log is not None and first.load is not None
        model = self.config.model
        placement = Placement(first.phy2log, model.num_experts, first.world_size)
        for reply in ordered:
            self._counts[reply.member] = reply.counts
        for member in self._counts:
            if member not in replies:  # left or died: its last published counters
                self._counts[member] = self._channel.counts(member) or self._counts[member]
        return _Check(diff, placement, first.load)

    def _book_lost(self, member: int) -> None:
        """A killed rank's requests in flight are lost (as of its last published counters)."""
        counts = self._channel.counts(member) or self._counts.get(member) or RequestCounts()
        self._counts[member] = replace(counts, lost=counts.lost + counts.in_flight, in_flight=0)
        # the store keeps what the dead rank wrote: overwrite it so later checks see the loss
        self._channel.report_counts(member, self._counts[member])

    def _requests(self) -> Requests:
        total = RequestCounts()
        for counts in self._counts.values():
            for name, value in counts.as_dict().items():
                setattr(total, name, getattr(total, name) + value)
        window = Requests.between(self._total, total)
        self._total = total
        return window

    def _row(
        self,
        label: str,
        world: int,
        end_to_end: float | None,
        blocking: float | None,
        phases: tuple[tuple[str, float], ...],
        moved: int,
        moved_bytes: int,
        previous: Placement | None,
        check: _Check,
        *,
        reloaded: int = 0,
        error: str | None = None,
        planned: tuple[float, float] | None = None,
    ) -> TimelineRow:
        """``planned``: balancedness before/after under the load the planner planned for (a
        scale or rebalance); without it, both under the load recorded at the check after the
        event (a window that may hold only a few steps since the commit)."""
        before: float | None
        if planned is None:
            before = None if previous is None else previous.balancedness(check.load)
            after = check.placement.balancedness(check.load)
        else:
            before, after = planned
        return TimelineRow(
            event=label,
            ok=error is None,
            error=error,
            world=world,
            end_to_end_s=end_to_end,
            blocking_s=blocking,
            phases=phases,
            experts_moved=moved,
            bytes_moved=moved_bytes,
            reloaded=reloaded,
            balance_before=before,
            balance_after=after,
            requests=self._requests(),
            max_abs_diff=check.max_abs_diff,
            atol=self.config.atol,
        )

    def _failed_row(self, label: str, error: str) -> TimelineRow:
        return TimelineRow(
            event=label,
            ok=False,
            error=error,
            world=0,
            end_to_end_s=None,
            blocking_s=None,
            phases=(),
            experts_moved=0,
            bytes_moved=0,
            reloaded=0,
            balance_before=None,
            balance_after=0.0,
            requests=Requests(),
            max_abs_diff=float("inf"),
            atol=self.config.atol,
        )

    def _say_load(self, load: torch.Tensor) -> None:
        share = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        hottest = float(share.max(dim=1).values.mean())
        self.out(
            f"  recorded load: the hottest expert of a layer gets {100 * hottest:.1f}% of its "
            f"routed tokens (uniform: {100 / load.shape[1]:.1f}%)"
        )

    def _row_line(self, row: TimelineRow) -> str:
        verdict = (
            "check passed" if row.passed else f"CHECK FAILED ({row.error or 'output differs'})"
        )
        before = "-" if row.balance_before is None else f"{row.balance_before:.3f}"
        return (
            f"{row.event}: {row.world} ranks, end-to-end {row.end_to_end_s or 0:.3f} s, "
            f"blocking {row.blocking_s or 0:.3f} s, balancedness {before} -> "
            f"{row.balance_after:.3f}, max |diff| {row.max_abs_diff:.2e}: {verdict}"
        )


def run_demo(config: DemoConfig, out: Callable[[str], None] = print) -> DemoResult:
    """Run the demo described by ``config``; every line goes to ``out``."""
    return DemoController(config, out).run()
