"""The demo's settings and its event script (``"rebalance,scale:6,scale:3:reject,kill:1"``).

Everything a run needs is one frozen :class:`DemoConfig`, checked before any process starts: the
script is simulated against the model's limits (every world size must hold every expert and fit
the preallocated placement buffers; on GPUs every rank needs its own device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from elastic_ep.moe import MoEModelConfig
from elastic_ep.scaling import GateMode, ScaleLimits

CPU_EVENTS = "rebalance,scale:6,scale:3:reject,kill:1,scale:4"
"""The default script on CPU (4 initial ranks): 4 -> 6 -> 3 -> 2 (a rank killed) -> 4."""
CPU_INITIAL_RANKS = 4


class EventKind(Enum):
    """What one step of the script does."""

    REBALANCE = "rebalance"  # re-plan the placement for the recorded load, same ranks
    SCALE = "scale"  # change the number of ranks through the coordinator
    KILL = "kill"  # SIGKILL the process serving one rank; the survivors recover


@dataclass(frozen=True)
class DemoEvent:
    """One step of the script.

    Attributes:
        kind: what to do.
        value: the new world size (``SCALE``) or the rank to kill (``KILL``); ``None`` else.
        mode: the traffic gate's mode while a scale runs (``SCALE`` only).
    """

    kind: EventKind
    value: int | None = None
    mode: GateMode = GateMode.DRAIN

    def __str__(self) -> str:
        if self.kind is EventKind.REBALANCE:
            return "rebalance"
        if self.kind is EventKind.KILL:
            return f"kill:{self.value}"
        return f"scale:{self.value}:{self.mode.value}"


def _parse_int(token: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"event {token!r}: {text!r} is not an integer") from None


def parse_event(token: str) -> DemoEvent:
    """``rebalance`` | ``scale:N[:drain|reject]`` | ``kill:RANK`` -> :class:`DemoEvent`.

    Raises ``ValueError`` naming the token for anything else.
    """
    parts = token.strip().lower().split(":")
    name, args = parts[0], parts[1:]
    if name == "rebalance" and not args:
        return DemoEvent(EventKind.REBALANCE)
    if name == "kill" and len(args) == 1:
        rank = _parse_int(token, args[0])
        if rank < 0:
            raise ValueError(f"event {token!r}: the rank must be >= 0")
        return DemoEvent(EventKind.KILL, rank)
    if name == "scale" and len(args) in (1, 2):
        size = _parse_int(token, args[0])
        if size < 1:
            raise ValueError(f"event {token!r}: the world size must be >= 1")
        mode = GateMode.DRAIN
        if len(args) == 2:
            try:
                mode = GateMode(args[1])
            except ValueError:
                raise ValueError(
                    f"event {token!r}: the gate mode must be 'drain' or 'reject'"
                ) from None
        return DemoEvent(EventKind.SCALE, size, mode)
    raise ValueError(f"bad event {token!r}: use rebalance, scale:N[:drain|reject] or kill:RANK")


def parse_events(script: str) -> tuple[DemoEvent, ...]:
    """A comma-separated script -> events (an empty script is allowed: start and check only)."""
    if not isinstance(script, str):
        raise TypeError(f"the event script must be a str, got {type(script).__name__}")
    return tuple(parse_event(t) for t in script.split(",") if t.strip())


def default_script(max_ranks: int) -> tuple[int, str]:
    """(initial ranks, script) that scales up, down and loses a rank on ``max_ranks`` devices."""
    if max_ranks < 2:
        raise ValueError(
            f"the demo needs at least 2 devices (a killed rank needs a survivor), got {max_ranks}"
        )
    if max_ranks == 2:
        return 2, "rebalance,scale:1:reject,scale:2,kill:1"
    top = max_ranks
    return top - 1, f"rebalance,scale:{top},scale:{top - 1}:reject,kill:1,scale:{top}"


def world_sizes(initial: int, events: tuple[DemoEvent, ...]) -> list[int]:
    """The world size after the start and after every event.

    Raises ``ValueError`` for a scale to the current size or a kill of a rank that is not there
    (or of the last one).
    """
    sizes = [initial]
    for i, event in enumerate(events):
        size = sizes[-1]
        if event.kind is EventKind.SCALE:
            assert event.value is not None
            if event.value == size:
                raise ValueError(f"event {i + 1} ({event}): the world already has {size} ranks")
            size = event.value
        elif event.kind is EventKind.KILL:
            assert event.value is not None
            if size < 2:
                raise ValueError(f"event {i + 1} ({event}): cannot kill the only rank")
            if event.value >= size:
                raise ValueError(
                    f"event {i + 1} ({event}): rank {event.value} does not exist in a world "
                    f"of {size}"
                )
            size -= 1
        sizes.append(size)
    return sizes


@dataclass(frozen=True)
class TrafficConfig:
    """Synthetic requests, per rank.

    Attributes:
        zipf_s: exponent of the Zipf law over experts (per layer, a seeded permutation decides
            which experts are hot); 0 is uniform.
        noise: standard deviation of a token's random part.
        bias: how strongly a token points at its target expert's gate row (vs ``noise``).
        requests_per_s: arrival rate at each rank's front end.
        decode_steps: forward steps a request stays in the batch.
        tokens_per_step: tokens one request adds to each forward step.
        max_active: requests in the batch at once (more wait in the engine's queue).
        drain_wait_s: how long a request may wait at a gate closed in drain mode.
        step_interval_s: shortest time between two forward steps (leaves CPU for the rest).
    """

    zipf_s: float = 1.2
    noise: float = 0.25
    bias: float = 0.75
    requests_per_s: float = 40.0
    decode_steps: int = 6
    tokens_per_step: int = 2
    max_active: int = 16
    drain_wait_s: float = 30.0
    step_interval_s: float = 0.01

    def __post_init__(self) -> None:
        for name in ("zipf_s", "noise", "bias", "drain_wait_s", "step_interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"traffic {name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.requests_per_s, (int, float)) and self.requests_per_s > 0):
            raise ValueError(f"traffic requests_per_s must be > 0, got {self.requests_per_s!r}")
        for name in ("decode_steps", "tokens_per_step", "max_active"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"traffic {name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class DemoConfig:
    """One run of the demo.

    Attributes:
        model: the seeded MoE model (every weight a function of seed, layer, expert).
        initial_ranks: ranks at the start.
        events: the script.
        slots_per_rank: S, expert slots per rank (constant over the run).
        backend: ``"gloo"`` (CPU processes) or ``"nccl"`` (one process per GPU).
        devices: GPUs available (``nccl``); ranks alive at once never exceed it.
        traffic: the synthetic requests.
        serve_s: seconds of traffic before each event (the load the planner sees).
        probe_tokens: tokens of the fixed batch checked against the reference after each event.
        atol: the largest max-abs difference that passes (fp32 rounding).
        window: forward steps in the load window.
        timeout_s: group timeout of the ranks (bounds the detection of a dead rank).
        scale_timeout_s: bound on one scale event.
        start_timeout_s: bound on starting the initial ranks.
    """

    model: MoEModelConfig = field(
        default_factory=lambda: MoEModelConfig(
            num_layers=4, num_experts=32, hidden_size=64, intermediate_size=64, top_k=2, seed=0
        )
    )
    initial_ranks: int = CPU_INITIAL_RANKS
    events: tuple[DemoEvent, ...] = field(default_factory=lambda: parse_events(CPU_EVENTS))
    slots_per_rank: int | None = None
    backend: str = "gloo"
    devices: int | None = None
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    serve_s: float = 1.0
    probe_tokens: int = 48
    atol: float = 1e-4
    window: int = 64
    timeout_s: float = 10.0
    scale_timeout_s: float = 60.0
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.backend == "nccl" and (self.devices is None or self.devices < 1):
            raise ValueError("the nccl backend needs devices >= 1 (one process per GPU)")
        if self.initial_ranks < 1:
            raise ValueError(f"initial_ranks must be >= 1, got {self.initial_ranks}")
        for name in ("serve_s", "atol", "timeout_s", "scale_timeout_s", "start_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.probe_tokens < 1 or self.window < 1:
            raise ValueError("probe_tokens and window must be >= 1")
        sizes = world_sizes(self.initial_ranks, self.events)
        if self.slots_per_rank is None:
            # every world size of the script must hold every expert
            object.__setattr__(self, "slots_per_rank", -(-self.model.num_experts // min(sizes)))
        limits = self.limits
        for size in sizes:
            limits.check_world_size(size)
        if self.backend == "nccl":
            assert self.devices is not None
            if max(sizes) > self.devices:
                raise ValueError(
                    f"the script reaches {max(sizes)} ranks but only {self.devices} devices "
                    "were given (one process per GPU); use fewer ranks or more --devices"
                )

    @property
    def slots(self) -> int:
        """S, expert slots per rank."""
        assert self.slots_per_rank is not None
        return self.slots_per_rank

    @property
    def max_ranks(self) -> int:
        """The largest world size the script reaches."""
        return max(world_sizes(self.initial_ranks, self.events))

    @property
    def limits(self) -> ScaleLimits:
        """What the coordinator checks requests against (capacity = the script's largest world)."""
        return ScaleLimits(self.model.num_experts, self.slots, self.max_ranks * self.slots)

    @property
    def max_physical_factor(self) -> float:
        """Capacity of the placement buffers as a multiple of E (for ``PlacementBuffers``)."""
        return self.limits.max_physical_slots / self.model.num_experts
