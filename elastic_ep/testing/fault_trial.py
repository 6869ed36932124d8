"""One fault trial: start a toy job on test hosts, scale it, inject a fault, classify the end.

:func:`run_trial` runs in the coordinator's process, on host 0 of a
:class:`~elastic_ep.testing.netns.TestNetwork` (its store listens on host 0's address), with
the ranks on the hosts (member ``m`` on host ``m % hosts``), launched from fork servers
(:class:`~elastic_ep.testing.host_launcher.ForkServerLauncher`) or, torchrun style, as fresh
processes (:class:`~elastic_ep.scaling.CommandLauncher`). It starts ``world`` ranks, submits a
scale to ``target`` (unless the fault is injected while serving), waits until the status shows
the trial's phase, waits ``after_s`` more and injects the fault into member ``victim``:

- ``sigkill``: the process dies (its sockets close at once);
- ``sigstop``: the process freezes (alive, sockets open: a hung GPU looks like this);
- ``partition``: the victim's host link goes down and stays down;
- ``flap``: the victim's host link goes down for 2 s, then comes back;
- ``coordinator``: the coordinator's process (this one, the store's host) is SIGKILLed; it
  first prints ``{"coordinator_killed": [members]}``, and the caller checks that the ranks
  serve on (``ToyConfig.progress_dir``).

It then waits, bounded by :func:`bound_s`, for the job to settle and classifies the end as one
:class:`Outcome`; every serving rank's weights are checked bit for bit against the status.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from enum import Enum
from typing import IO, Any

from torch.distributed import TCPStore

from elastic_ep.scaling import (
    CommandLauncher,
    ElasticCoordinator,
    Launcher,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
)
from elastic_ep.scaling.status import EventKind
from elastic_ep.testing.host_launcher import ForkServerLauncher
from elastic_ep.testing.netns import TestNetwork
from elastic_ep.testing.toy_engine import ToyConfig, check_weights

FLAP_S = 2.0  # how long a flapping link stays down


class Fault(Enum):
    NONE = "none"
    SIGKILL = "sigkill"
    SIGSTOP = "sigstop"
    PARTITION = "partition"
    FLAP = "flap"
    COORDINATOR = "coordinator"


class Outcome(Enum):
    """How a trial ended (the first five are correct ends; the last three are bugs)."""

    COMPLETED = "completed"  # the scale committed
    ROLLED_BACK = "rolled_back"  # the scale was undone; the old epoch serves
    RECOVERED = "recovered"  # the reachable ranks serve a new epoch without the lost ones
    UNRECOVERABLE = "unrecoverable"  # failed with a clear error (e.g. too few ranks left)
    HANG = "hang"  # no end within the bound
    WRONG_DATA = "wrong_data"  # a serving rank holds a wrong weight or a wrong rank
    CRASH = "crash"  # an unexpected exception, or a listed member that does not serve


@dataclass(frozen=True)
class Trial:
    """One trial's parameters (picklable, JSON-able with :func:`dataclasses.asdict`).

    Attributes:
        seed: the trial's seed (printed with every failure).
        world / target: world size before and after the scale (``target == world``: no scale).
        fault / victim: the fault and the member id it hits.
        phase: ``"serving"`` (no scale) or the scale phase (a ``ScalePhase`` value) to wait for.
        after_s: seconds after the phase is seen before the fault.
        timeout_s: the group timeout of the job.
        scale_timeout_s: the scale request's timeout.
    """

    seed: int
    world: int
    target: int
    fault: str
    victim: int
    phase: str = "serving"
    after_s: float = 0.0
    timeout_s: float = 2.0
    scale_timeout_s: float = 15.0
    cfg: dict[str, Any] = field(default_factory=dict)


PHASES = ("serving", "preparing", "syncing_kv", "rebalancing", "committing")
RANDOM_FAULTS = ("sigkill", "sigstop", "partition", "flap")


def random_trial(seed: int) -> Trial:
    """The fault sweep's trial of ``seed`` (the same seed always gives the same trial): 2-5
    ranks, a scale to 2-6 ranks or none, a random fault into a random member (old or joining)
    at a random phase plus 0-0.5 s; 6 experts in 3 groups, 4 slots per rank, ``T`` = 2 s."""
    rng = random.Random(seed)
    world = rng.randint(2, 5)
    phase = rng.choice(PHASES)
    target = world if phase == "serving" else rng.choice([n for n in range(2, 7) if n != world])
    members = list(range(max(world, target)))
    return Trial(
        seed=seed,
        world=world,
        target=target,
        fault=rng.choice(RANDOM_FAULTS),
        victim=rng.choice(members),
        phase=phase,
        after_s=round(rng.uniform(0.0, 0.5), 3),
        timeout_s=2.0,
        scale_timeout_s=10.0,
        cfg={"experts": 6, "slots": 4, "num_groups": 3},
    )


def bound_s(trial: Trial) -> float:
    """How long a trial may take to settle after the fault (the documented bounds): a scale ends
    within its timeout plus the group timeout; a recovery needs detection (the group timeout),
    the survivors' agreement window (timeout + 1 s) and a rebuild (two group timeouts)."""
    recovery = trial.timeout_s + (trial.timeout_s + 1.0) + 2 * trial.timeout_s
    return trial.scale_timeout_s + trial.timeout_s + recovery + FLAP_S + 10.0


@dataclass(frozen=True)
class Network:
    """Where the hosts are: per host, the command prefix and the address; the switch's netns."""

    prefixes: tuple[tuple[str, ...], ...]
    addresses: tuple[str, ...]
    switch: str | None = None

    @property
    def hosts(self) -> int:
        return len(self.prefixes)

    def link(self, host: int, up: bool) -> None:
        if self.switch is None:
            raise ValueError("partitions need test hosts (a TestNetwork)")
        subprocess.run(
            ["ip", "-n", self.switch, "link", "set", f"v{host}", "up" if up else "down"],
            check=True,
            timeout=30,
        )


def _limits(cfg: ToyConfig) -> ScaleLimits:
    return ScaleLimits(
        num_logical=cfg.experts, slots_per_rank=cfg.slots, max_physical_slots=8 * cfg.slots
    )


def cut_off(trial: Trial, hosts: int, members: Sequence[int]) -> frozenset[int]:
    """The members the fault takes away for good (they must not serve at the end): the victim
    (``sigkill``, ``sigstop``); for a ``partition``, the members on the far side from the
    coordinator's host 0; none for a ``flap`` or no fault."""
    fault = Fault(trial.fault)
    if fault in (Fault.SIGKILL, Fault.SIGSTOP):
        return frozenset({trial.victim})
    if fault is Fault.PARTITION:
        cut = trial.victim % hosts
        if cut == 0:
            return frozenset(m for m in members if m % hosts != 0)
        return frozenset(m for m in members if m % hosts == cut)
    return frozenset()


def _settled(
    coord: ElasticCoordinator, scaled: bool, gone: frozenset[int], quiet_s: float, deadline: float
) -> ScaleStatus | None:
    """The status once the job is settled: no event running, the scale (if any) ended, none of
    ``gone`` serving, and no change for ``quiet_s``; ``None`` at the deadline."""
    since, last = time.monotonic(), coord.status()
    while time.monotonic() < deadline:
        status = coord.status()
        if status != last:
            since, last = time.monotonic(), status
        done = (
            not status.phase.is_active
            and (not scaled or status.event_id > 0)
            and not gone & set(status.members)
        )
        if done and time.monotonic() - since >= quiet_s:
            return status
        time.sleep(0.02)
    return None


def _classify(status: ScaleStatus, trial: Trial) -> Outcome:
    if status.phase is ScalePhase.FAILED:
        return Outcome.UNRECOVERABLE if status.error else Outcome.CRASH
    if status.event is EventKind.RECOVERY:
        return Outcome.RECOVERED
    if status.phase is ScalePhase.ROLLED_BACK:
        return Outcome.ROLLED_BACK
    if status.phase is ScalePhase.COMPLETED and status.world_size == trial.target:
        return Outcome.COMPLETED
    return Outcome.COMPLETED if trial.target == trial.world else Outcome.CRASH


def _inject(
    trial: Trial, coord: ElasticCoordinator, net: Network, pid: int | None
) -> threading.Thread | None:
    fault = Fault(trial.fault)
    host = trial.victim % net.hosts
    if fault is Fault.SIGKILL and pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    elif fault is Fault.SIGSTOP and pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    elif fault is Fault.PARTITION:
        net.link(host, up=False)
    elif fault is Fault.COORDINATOR:
        print(json.dumps({"coordinator_killed": list(coord.status().members)}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault is Fault.FLAP:
        net.link(host, up=False)
        heal = threading.Timer(FLAP_S, net.link, (host, True))
        heal.start()
        return heal
    return None


def _exits(coord: ElasticCoordinator) -> dict[int, str]:
    """The errors ranks wrote as they exited (``toy/exit/<member>``)."""
    host, port = coord.store_address
    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10))
    last = coord.status()
    members = range(max([*last.members, *last.dead_members, 0]) + 8)
    return {
        m: store.get(f"toy/exit/{m}").decode() for m in members if store.check([f"toy/exit/{m}"])
    }


def _pid_of(coord: ElasticCoordinator, member: int, deadline: float) -> int | None:
    """The pid of ``member``'s process once launched (a joiner is launched after the scale's
    publication); ``None`` if it is not launched by ``deadline`` or already reaped."""
    while time.monotonic() < deadline:
        try:
            pid: int | None = getattr(coord.handle(member), "pid", None)
            return pid
        except KeyError:
            time.sleep(0.01)
    return None


def run_trial(trial: Trial, net: Network, launcher: Launcher) -> dict[str, Any]:
    """Run ``trial`` (see the module docstring); return its record: outcome, detail, seconds."""
    cfg = ToyConfig(hosts=net.hosts, **trial.cfg)
    coord = ElasticCoordinator(
        launcher,
        _limits(cfg),
        host=net.addresses[0],
        config=cfg,
        timeout_s=trial.timeout_s,
        leave_timeout_s=trial.timeout_s + 5.0,
    )
    record: dict[str, Any] = {"trial": asdict(trial)}
    heal: threading.Thread | None = None
    started = time.monotonic()
    try:
        coord.start(trial.world, timeout_s=60)
        scaled = trial.phase != "serving"
        if scaled:
            coord.submit(ScaleRequest(world_size=trial.target, timeout_s=trial.scale_timeout_s))
            wanted = ScalePhase(trial.phase)
            deadline = time.monotonic() + trial.scale_timeout_s
            while coord.status().phase is not wanted and coord.status().phase.is_active:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        time.sleep(trial.after_s)
        record["phase_seen"] = coord.status().phase.value
        pid = _pid_of(coord, trial.victim, time.monotonic() + 10.0)
        fault_at = time.monotonic()
        heal = _inject(trial, coord, net, pid)
        members = {*coord.status().members, trial.victim}
        gone = cut_off(trial, net.hosts, sorted(members)) if pid is not None else frozenset()
        quiet_s = FLAP_S + trial.timeout_s if Fault(trial.fault) is Fault.FLAP else 0.3
        status = _settled(coord, scaled, gone, quiet_s, fault_at + bound_s(trial))
        record["settle_s"] = round(time.monotonic() - fault_at, 3)
        if status is None:
            record.update(
                outcome=Outcome.HANG.value, detail=str(coord.status()), exits=_exits(coord)
            )
            return record
        outcome = _classify(status, trial)
        record.update(
            outcome=outcome.value,
            status=status.to_json(),
            detail=status.error,
        )
        if outcome in (Outcome.COMPLETED, Outcome.ROLLED_BACK, Outcome.RECOVERED):
            host, port = coord.store_address
            store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
            problem = check_weights(store, status, 20.0)
            if problem is not None:
                wrong = "wrong weights" in problem or "rank" in problem.split(":", 1)[-1]
                record.update(
                    outcome=(Outcome.WRONG_DATA if wrong else Outcome.CRASH).value, detail=problem
                )
    except Exception as exc:
        record.update(outcome=Outcome.CRASH.value, detail=f"{type(exc).__name__}: {exc}")
    finally:
        record["seconds"] = round(time.monotonic() - started, 3)
        if heal is not None:
            heal.join()
        if net.switch is not None:
            for h in range(net.hosts):
                net.link(h, up=True)
        if isinstance(launcher, ForkServerLauncher):
            launcher.kill_all()  # stopped and partitioned ranks too
        coord.shutdown(timeout_s=2.0)
    return record


def command_launcher(net: Network, module: str = "elastic_ep.testing.toy_engine") -> Launcher:
    """Fresh processes, torchrun style: ``python -m module`` on the member's host."""
    return CommandLauncher(
        lambda spec: [*net.prefixes[spec.member_id % net.hosts], sys.executable, "-m", module],
        local_rank=lambda spec: spec.member_id // net.hosts,
        env={"GLOO_SOCKET_IFNAME": "eth0"} if net.switch is not None else {},
    )


def _network_of(net: TestNetwork) -> Network:
    return Network(
        prefixes=tuple(tuple(h.command([])) for h in net.hosts),
        addresses=tuple(h.address for h in net.hosts),
        switch=net.switch,
    )


def _pump(stream: IO[bytes], lines: queue.Queue[bytes]) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(b"")  # end of output


def run_on_test_hosts(
    trials: Sequence[Trial],
    *,
    hosts: int = 3,
    launcher: str = "fork",
    delay_ms: float | Sequence[float] = 0.0,
    loss: float | Sequence[float] = 0.0,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Run ``trials`` in order on a fresh :class:`TestNetwork` of ``hosts`` hosts; yield each
    trial's record as it ends. The coordinator runs in a process on host 0; a trial that does
    not end within :func:`bound_s` plus start-up margins is recorded as a hang (and the run
    stops: its processes are killed with the network)."""
    with TestNetwork(hosts, delay_ms=delay_ms, loss=loss, seed=seed) as net:
        request = {
            "network": asdict(_network_of(net)),
            "launcher": launcher,
            "trials": [asdict(t) for t in trials],
        }
        inner = net.hosts[0].popen(
            [sys.executable, "-m", "elastic_ep.testing.fault_trial", json.dumps(request)],
            stdout=subprocess.PIPE,
        )
        assert inner.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=_pump, args=(inner.stdout, lines), daemon=True).start()
        for trial in trials:
            try:
                line = lines.get(timeout=bound_s(trial) + trial.scale_timeout_s + 90.0)
            except queue.Empty:
                yield {"trial": asdict(trial), "outcome": Outcome.HANG.value, "detail": "no record"}
                return
            if not line.startswith(b"{"):
                yield {
                    "trial": asdict(trial),
                    "outcome": Outcome.CRASH.value,
                    "detail": "driver died",
                }
                return
            yield json.loads(line)
        inner.wait(timeout=60)


def _main(request: dict[str, Any]) -> None:
    net = Network(
        prefixes=tuple(tuple(p) for p in request["network"]["prefixes"]),
        addresses=tuple(request["network"]["addresses"]),
        switch=request["network"]["switch"],
    )
    launcher: Launcher
    if request["launcher"] == "fork":
        launcher = ForkServerLauncher(
            "elastic_ep.testing.toy_engine:rank_main", net.prefixes, lambda m: m % net.hosts
        )
    else:
        launcher = command_launcher(net)
    try:
        for fields in request["trials"]:
            record = run_trial(Trial(**fields), net, launcher)
            print(json.dumps(record), flush=True)
    finally:
        if isinstance(launcher, ForkServerLauncher):
            launcher.close()


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
