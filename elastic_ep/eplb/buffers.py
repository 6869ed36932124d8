"""PlacementBuffers: preallocated placement tensors whose addresses never change.

A captured CUDA graph reads the routing tables through fixed pointers. Scale events change the
number of physical slots, so the tables are allocated once for the largest placement the engine
will ever use (``ceil(max_physical_factor * E)`` slots per layer) and rewritten in place.

Routing shares (``Placement.units``): a ``log2phy`` row holds each slot once per routing unit,
so rows are ``max_units(capacity, E)`` wide (``min(32 * max_replicas, 1024)``, at least
``max_replicas``), which holds every placement whose P slots fit (``max_units`` grows with P).
``share_factor=1`` keeps the rows at ``max_replicas`` for placements without shares
(``plan(..., shares=False)``).
"""

from __future__ import annotations

import math

import torch

from elastic_ep.eplb.placement import (
    EMPTY,
    SHARE_FACTOR,
    Placement,
    log2phy_from_phy2log,
    max_units,
)


class PlacementBuffers:
    """Fixed-address ``phy2log``, ``log2phy`` and ``logcnt`` tensors, updated in place.

    Attributes:
        phy2log: int64 [L, capacity]; slots beyond the current placement read -1.
        log2phy: int64 [L, E, row_width]; each expert's slots, repeated per routing unit
            (``Placement.log2phy``), -1 padded.
        logcnt: int64 [L, E]; entries of each row (replicas, or their routing units summed).
        capacity: ``ceil(max_physical_factor * E)`` physical slots per layer.
        max_replicas: ``capacity - E + 1``, the most replicas one expert can have while every
            other expert keeps one.
        row_width: ``max_units(capacity, E, share_factor)``, the most entries (routing units)
            of a row.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical: int,
        max_physical_factor: float,
        device: torch.device | str = "cpu",
        share_factor: int = SHARE_FACTOR,
    ) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(num_logical, int) or num_logical < 1:
            raise ValueError(f"num_logical must be a positive int, got {num_logical!r}")
        if not isinstance(max_physical_factor, (int, float)) or not max_physical_factor >= 1.0:
            raise ValueError(f"max_physical_factor must be >= 1.0, got {max_physical_factor!r}")
        if not isinstance(share_factor, int) or share_factor < 1:
            raise ValueError(f"share_factor must be a positive int, got {share_factor!r}")
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.max_physical_factor = float(max_physical_factor)
        self.capacity = math.ceil(self.max_physical_factor * num_logical)
        self.max_replicas = self.capacity - num_logical + 1
        self.share_factor = share_factor
        self.row_width = max_units(self.capacity, num_logical, share_factor)
        self.phy2log = torch.full(
            (num_layers, self.capacity), EMPTY, dtype=torch.int64, device=device
        )
        self.log2phy = torch.full(
            (num_layers, num_logical, self.row_width), EMPTY, dtype=torch.int64, device=device
        )
        self.logcnt = torch.zeros((num_layers, num_logical), dtype=torch.int64, device=device)
        self.num_slots = 0

    def check_fits(self, placement: Placement) -> None:
        """Raise ``ValueError`` if ``placement`` does not fit these buffers."""
        if (placement.num_layers, placement.num_logical) != (self.num_layers, self.num_logical):
            raise ValueError(
                f"placement is {placement.num_layers} layers x {placement.num_logical} experts, "
                f"buffers are {self.num_layers} x {self.num_logical}"
            )
        if placement.num_slots > self.capacity:
            raise ValueError(
                f"placement needs {placement.num_slots} physical slots per layer, but "
                f"max_physical_factor={self.max_physical_factor} gives capacity {self.capacity} "
                f"for {self.num_logical} experts (needs factor >= "
                f"{placement.num_slots / self.num_logical:.4g})"
            )
        most = int(placement.logcnt.max())
        if most > self.row_width:
            layer, expert = divmod(int(placement.logcnt.argmax()), self.num_logical)
            raise ValueError(
                f"placement gives expert {expert} of layer {layer} "
                f"{int(placement.replicas[layer, expert])} replicas with {most} routing units, "
                f"but a log2phy row holds at most {self.row_width} entries "
                f"(max_physical_factor={self.max_physical_factor}, "
                f"share_factor={self.share_factor})"
            )

    def update_(self, placement: Placement) -> None:
        """Write ``placement`` into the buffers in place; unused capacity reads -1.

        Raises ``ValueError`` (buffers unchanged) if it does not fit.
        """
        self.check_fits(placement)
        phy2log = torch.full((self.num_layers, self.capacity), EMPTY, dtype=torch.int64)
        phy2log[:, : placement.num_slots] = placement.phy2log
        log2phy = log2phy_from_phy2log(
            placement.phy2log,
            self.num_logical,
            placement.logcnt,
            self.row_width,
            units=placement.units,
        )
        self.phy2log.copy_(phy2log, non_blocking=False)
        self.log2phy.copy_(log2phy)
        self.logcnt.copy_(placement.logcnt)
        self.num_slots = placement.num_slots
