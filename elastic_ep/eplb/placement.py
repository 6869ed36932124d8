"""Placement: which logical expert each physical slot holds, for every MoE layer.

Shapes use: L = MoE layers, E = logical experts, R = ranks, S = slots per rank, P = R * S.
Slot ``p`` lives on rank ``p // S`` (rank-major). ``-1`` in ``phy2log`` always means "empty slot"
and nothing else.

Routing shares: ``units`` int64 [L, P] gives every occupied slot a whole number of routing units
(>= 1; 0 on empty slots), and an expert's replica in slot ``p`` takes ``units[p] / logcnt[e]`` of
its tokens, ``logcnt[e]`` being the expert's units summed. The routing tables express a share as
a multiplicity: slot ``p`` appears ``units[p]`` times in its expert's ``log2phy`` row, and the
router's split over a row's entries then gives each replica its share. All units 1 (the
default) is the equal split over replicas. An expert with more units than replicas keeps its
total within ``max_units = max(P - E + 1, min(SHARE_FACTOR * (P - E + 1), MAX_SHARE_UNITS))``:
the row width of any :class:`~elastic_ep.eplb.PlacementBuffers` that holds P slots, so every
plan fits the buffers its slot count fits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from elastic_ep.rank_mapping import RankMapping

EMPTY = -1
"""Value of an empty physical slot in ``phy2log`` and of padding in ``log2phy``."""
SHARE_FACTOR = 32
"""Routing units an expert may have per replica the tables could hold (up to
``MAX_SHARE_UNITS``); see :func:`max_units`."""
MAX_SHARE_UNITS = 1024
"""Cap on ``SHARE_FACTOR * (P - E + 1)``: a row of 1024 int64 entries per expert and layer
(122 MB for 58 layers x 256 experts) however many slots there are."""


@dataclass(frozen=True, eq=False)
class Placement:
    """Expert placement of L layers over R ranks with S slots each.

    Attributes:
        phy2log: int64 [L, R*S] (CPU): logical expert id in each physical slot, -1 = empty.
            Stored as a private copy; do not modify it in place.
        num_logical: E, the number of logical experts per layer.
        num_ranks: R.
        units: int64 [L, R*S] (CPU): routing units of each slot, >= 1 where occupied, 0 where
            empty; ``None`` (the default) stores all ones, the equal split. An expert whose units
            exceed its replica count keeps its total within :attr:`max_units`.
    """

    phy2log: torch.Tensor
    num_logical: int
    num_ranks: int
    units: torch.Tensor = None  # type: ignore[assignment]  # None: all ones, set in __post_init__

    def __post_init__(self) -> None:
        t = self.phy2log
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"phy2log must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"phy2log must be int64, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"phy2log must be 2-D [layers, slots], got shape {tuple(t.shape)}")
        for name in ("num_logical", "num_ranks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if t.shape[1] % self.num_ranks != 0:
            raise ValueError(
                f"phy2log has {t.shape[1]} slots per layer, not a multiple of num_ranks={self.num_ranks}"
            )
        bad = (t < EMPTY) | (t >= self.num_logical)
        if bool(bad.any()):
            layer, slot = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"phy2log[{layer}, {slot}] = {int(t[layer, slot])} is not an expert id in "
                f"[0, {self.num_logical}) nor -1 (empty)"
            )
        object.__setattr__(self, "phy2log", t.detach().to("cpu", copy=True).contiguous())
        if self.units is None:
            object.__setattr__(self, "units", (self.phy2log >= 0).to(torch.int64))
        else:
            self._check_units()

    def _check_units(self) -> None:
        units = self.units
        if not isinstance(units, torch.Tensor):
            raise TypeError(f"units must be a torch.Tensor or None, got {type(units).__name__}")
        if units.dtype != torch.int64 or units.shape != self.phy2log.shape:
            raise TypeError(
                f"units must be int64 {tuple(self.phy2log.shape)} like phy2log, got "
                f"{units.dtype} {tuple(units.shape)}"
            )
        units = units.detach().to("cpu", copy=True).contiguous()
        occupied = self.phy2log >= 0
        bad = (occupied & (units < 1)) | (~occupied & (units != 0))
        if bool(bad.any()):
            layer, slot = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"units[{layer}, {slot}] = {int(units[layer, slot])}: an occupied slot needs >= 1 "
                f"routing unit and an empty one 0"
            )
        object.__setattr__(self, "units", units)
        over = (self.logcnt > self.replicas) & (self.logcnt > self.max_units)
        if bool(over.any()):
            layer, expert = (int(i) for i in over.nonzero()[0])
            raise ValueError(
                f"layer {layer}: expert {expert} has {int(self.logcnt[layer, expert])} routing "
                f"units, more than max_units = {self.max_units} for {self.num_slots} slots"
            )

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def _trusted(
        cls,
        phy2log: torch.Tensor,
        num_logical: int,
        num_ranks: int,
        units: torch.Tensor | None = None,
    ) -> Placement:
        """A placement over ``phy2log`` int64 [L, R*S] and ``units`` (same shape; ``None`` =
        equal split), contiguous, CPU, owned by the caller from now on, without the checks of
        the public constructor: for the planner, whose output is valid by construction and is
        checked by its property tests."""
        placement = object.__new__(cls)
        object.__setattr__(placement, "phy2log", phy2log)
        object.__setattr__(placement, "num_logical", num_logical)
        object.__setattr__(placement, "num_ranks", num_ranks)
        if units is None:
            units = (phy2log >= 0).to(torch.int64)
        object.__setattr__(placement, "units", units)
        return placement

    @classmethod
    def empty(
        cls, num_layers: int, num_logical: int, num_ranks: int, slots_per_rank: int
    ) -> Placement:
        """A placement with every slot empty (e.g. the 'previous' of a rank that just joined)."""
        return cls(
            torch.full((num_layers, num_ranks * slots_per_rank), EMPTY, dtype=torch.int64),
            num_logical,
            num_ranks,
        )

    # ---- shape --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        """P = R * S, physical slots per layer."""
        return int(self.phy2log.shape[1])

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @cached_property
    def rank_of_slot(self) -> torch.Tensor:
        """int64 [P]: the rank that holds each physical slot."""
        return torch.arange(self.num_slots, dtype=torch.int64) // self.slots_per_rank

    def local_slots(self, rank: int) -> torch.Tensor:
        """int64 [L, S]: the logical experts in ``rank``'s slots (-1 = empty)."""
        s = self.slots_per_rank
        return self.phy2log[:, rank * s : (rank + 1) * s]

    # ---- derived maps ------------------------------------------------------------------------
    @property
    def max_units(self) -> int:
        """The most routing units an expert with shares may have (:func:`max_units`)."""
        return max_units(self.num_slots, self.num_logical)

    @cached_property
    def replicas(self) -> torch.Tensor:
        """int64 [L, E]: number of replicas (non-empty slots) of each logical expert."""
        counts = torch.zeros(self.num_layers, self.num_logical + 1, dtype=torch.int64)
        counts.scatter_add_(1, self.phy2log + 1, torch.ones_like(self.phy2log))
        return counts[:, 1:]

    @cached_property
    def logcnt(self) -> torch.Tensor:
        """int64 [L, E]: entries of each expert's ``log2phy`` row, its slots' routing units
        summed (the replica count when every unit is 1; 0 = expert not placed)."""
        counts = torch.zeros(self.num_layers, self.num_logical + 1, dtype=torch.int64)
        counts.scatter_add_(1, self.phy2log + 1, self.units)
        return counts[:, 1:]

    @property
    def has_shares(self) -> bool:
        """Whether any slot has more than one routing unit (an uneven split)."""
        return bool((self.units > 1).any())

    @cached_property
    def log2phy(self) -> torch.Tensor:
        """int64 [L, E, max(logcnt)]: each expert's slots, slot ``p`` repeated ``units[p]``
        times and interleaved (see :func:`log2phy_from_phy2log`), -1 padded. With all units 1:
        the expert's slots, ascending."""
        return log2phy_from_phy2log(self.phy2log, self.num_logical, self.logcnt, units=self.units)

    @cached_property
    def presence(self) -> torch.Tensor:
        """bool [L, R, E]: whether rank r holds at least one replica of expert e."""
        present = torch.zeros(
            self.num_layers, self.num_ranks, self.num_logical + 1, dtype=torch.bool
        )
        rank = self.rank_of_slot.expand(self.num_layers, -1)
        present[
            torch.arange(self.num_layers).unsqueeze(1).expand_as(rank), rank, self.phy2log + 1
        ] = True
        return present[:, :, 1:]

    # ---- checks ------------------------------------------------------------------------------
    def validate(self, *, allow_missing: bool = False, distinct_ranks: bool = False) -> None:
        """Raise ``ValueError`` naming the layer/expert/rank at fault.

        Args:
            allow_missing: accept logical experts with no replica (e.g. lost with a dead rank).
            distinct_ranks: require that no rank holds two replicas of one expert.
        """
        if not allow_missing:
            missing = (self.logcnt == 0).nonzero()
            if missing.numel():
                layer, expert = (int(i) for i in missing[0])
                raise ValueError(
                    f"layer {layer}: logical expert {expert} has no replica "
                    f"({missing.shape[0]} (layer, expert) pairs missing in all)"
                )
        if distinct_ranks:
            per_rank = self.presence.sum(-1)  # distinct experts per rank
            nonempty = (self.phy2log >= 0).view(self.num_layers, self.num_ranks, -1).sum(-1)
            dup = (per_rank != nonempty).nonzero()
            if dup.numel():
                layer, rank = (int(i) for i in dup[0])
                raise ValueError(f"layer {layer}: rank {rank} holds two replicas of one expert")

    # ---- metrics -----------------------------------------------------------------------------
    def rank_loads(self, load: torch.Tensor) -> torch.Tensor:
        """float64 [L, R]: load per rank, each expert's load split over its replicas by their
        routing shares (slot ``p`` of expert ``e`` takes ``load[e] * units[p] / logcnt[e]``).

        Args:
            load: [L, E] non-negative load per logical expert (any real dtype).
        """
        load = _check_load(load, self.num_layers, self.num_logical)
        per_unit = load / self.logcnt.clamp(min=1).to(torch.float64)
        padded = torch.cat([torch.zeros(self.num_layers, 1, dtype=torch.float64), per_unit], 1)
        slot_load = padded.gather(1, self.phy2log + 1) * self.units
        return slot_load.view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(-1)

    def balancedness(self, load: torch.Tensor) -> float:
        """Mean over layers of (mean rank load / max rank load); 1.0 is perfect.

        Args:
            load: [L, E] non-negative load per logical expert. A layer with no load counts as 1.
        """
        loads = self.rank_loads(load)
        peak = loads.max(dim=1).values
        ratio = torch.where(peak > 0, loads.mean(dim=1) / peak.clamp(min=1e-300), 1.0)
        return float(ratio.mean())

    def transfers_from(
        self, previous: Placement, rank_mapping: RankMapping | None = None
    ) -> torch.Tensor:
        """int64 [L, R_new]: expert weights each rank must receive to go from ``previous`` to this.

        An expert already on the receiving rank (under ``rank_mapping``; identity if ``None``)
        is free; a joined rank starts with nothing. Routing shares move no weights.
        """
        if previous.num_layers != self.num_layers or previous.num_logical != self.num_logical:
            raise ValueError(
                f"previous has {previous.num_layers} layers x {previous.num_logical} experts, "
                f"this placement {self.num_layers} x {self.num_logical}"
            )
        mapping = rank_mapping or RankMapping.identity(previous.num_ranks)
        if mapping.old_world_size != previous.num_ranks or mapping.new_world_size != self.num_ranks:
            raise ValueError(
                f"rank_mapping maps {mapping.old_world_size} -> {mapping.new_world_size} ranks, "
                f"placements have {previous.num_ranks} -> {self.num_ranks}"
            )
        had = torch.zeros_like(self.presence)
        for new_rank, old_rank in enumerate(mapping.new_to_old):
            if old_rank is not None:
                had[:, new_rank] = previous.presence[:, old_rank]
        return (self.presence & ~had).sum(-1)

    def lost_with(self, ranks: Iterable[int]) -> torch.Tensor:
        """bool [L, E]: experts whose every replica is on one of ``ranks`` (e.g. dead ranks)."""
        dead = sorted(set(ranks))
        keep = torch.ones(self.num_ranks, dtype=torch.bool)
        keep[dead] = False
        return (self.logcnt > 0) & ~self.presence[:, keep].any(1)

    # ---- value semantics -----------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (
            self.num_logical == other.num_logical
            and self.num_ranks == other.num_ranks
            and self.phy2log.shape == other.phy2log.shape
            and bool(torch.equal(self.phy2log, other.phy2log))
            and bool(torch.equal(self.units, other.units))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, experts={self.num_logical}, "
            f"ranks={self.num_ranks}, slots_per_rank={self.slots_per_rank})"
        )


def log2phy_from_phy2log(
    phy2log: torch.Tensor,
    num_logical: int,
    logcnt: torch.Tensor,
    max_replicas: int | None = None,
    *,
    units: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 [L, E, max_replicas]: the routing row of each logical expert, -1 padded.

    Without ``units`` (or with all units 1) a row is the expert's slots, ascending. With
    ``units``, slot ``p`` appears ``units[p]`` times, interleaved: copy ``j`` of slot ``p`` sits
    at key ``(j + 1/2) / units[p]`` and a row lists its entries by key (ties by slot). A 2:1
    split reads ``a b a``, 4:2 ``a b a a b a``: every run of consecutive entries, so every small
    batch the router splits over a row, gives each slot close to its share, where
    ``a a a a b b`` would send a batch of four pairs to ``a`` alone.

    Args:
        phy2log: int64 [L, P], -1 = empty.
        num_logical: E.
        logcnt: int64 [L, E], entries per row: the experts' units summed (as ``Placement.logcnt``).
        max_replicas: width of the last dim; defaults to ``max(1, logcnt.max())``.
        units: int64 [L, P] routing units per slot (0 on empty slots); ``None`` = all ones.
    """
    num_layers, num_slots = phy2log.shape
    width = max(1, int(logcnt.max())) if max_replicas is None else max_replicas
    out = torch.full((num_layers, num_logical, width), EMPTY, dtype=torch.int64)
    if units is not None and bool((units > 1).any()):
        _interleaved_rows(out, phy2log.numpy(), units.numpy())
        return out
    sorted_ids, order = torch.sort(phy2log, dim=1, stable=True)
    # Position of each sorted entry within its expert's run = index - start of the run.
    starts = torch.cumsum(logcnt, dim=1) - logcnt + (phy2log < 0).sum(1, keepdim=True)
    valid = sorted_ids >= 0
    layer_idx = torch.arange(num_layers).unsqueeze(1).expand(-1, num_slots)[valid]
    expert_idx = sorted_ids[valid]
    position = torch.arange(num_slots).expand(num_layers, -1)[valid]
    replica_idx = position - starts[layer_idx, expert_idx]
    out[layer_idx, expert_idx, replica_idx] = order[valid]
    return out


def _interleaved_rows(out: torch.Tensor, phy2log: np.ndarray, units: np.ndarray) -> None:
    """Fill ``out`` int64 [L, E, W] with every slot of ``phy2log`` int64 [L, P] repeated
    ``units`` int64 [L, P] times, each row ordered by the keys of :func:`log2phy_from_phy2log`."""
    num_slots = phy2log.shape[1]
    flat_units = units.ravel()
    entry_slot = np.repeat(np.arange(flat_units.size), flat_units)  # flat (layer, slot) per entry
    first = np.cumsum(flat_units) - flat_units
    copy = np.arange(entry_slot.size) - first[entry_slot]
    key = (copy + 0.5) / flat_units[entry_slot]
    layer = entry_slot // num_slots
    expert = phy2log.ravel()[entry_slot]
    order = np.lexsort((entry_slot, key, expert, layer))
    row = (layer * out.shape[1] + expert)[order]
    # Rank within a row = position - the row's first position (rows are contiguous in order).
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    lengths = np.diff(np.r_[starts, row.size])
    position = np.arange(row.size) - np.repeat(starts, lengths)
    flat = out.view(-1)
    flat[torch.from_numpy(row * out.shape[2] + position)] = torch.from_numpy(
        entry_slot[order] % num_slots
    )


def max_units(num_slots: int, num_logical: int, factor: int = SHARE_FACTOR) -> int:
    """The most routing units an expert with shares may have in a placement of ``num_slots``
    P slots per layer: ``max(P - E + 1, min(factor * (P - E + 1), MAX_SHARE_UNITS))`` (at
    least 1). It grows with P, so buffers sized for P slots hold every smaller placement."""
    replicas = max(1, num_slots - num_logical + 1)
    return max(replicas, min(factor * replicas, MAX_SHARE_UNITS))


def _check_load(load: torch.Tensor, num_layers: int, num_logical: int) -> torch.Tensor:
    if not isinstance(load, torch.Tensor):
        load = torch.as_tensor(load)
    if load.shape != (num_layers, num_logical):
        raise ValueError(
            f"load must have shape [{num_layers}, {num_logical}], got {tuple(load.shape)}"
        )
    if load.dtype == torch.bool or load.is_complex():
        raise TypeError(f"load must be real numbers, got {load.dtype}")
    load = load.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError("load must be finite and non-negative")
    return load
