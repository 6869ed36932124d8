"""PlacementBuffers: preallocated placement tensors whose addresses never change.

A captured CUDA graph reads the routing tables through fixed pointers. Scale events change the
number of physical slots, so the tables are allocated once for the largest placement the engine
will ever use (``ceil(max_physical_factor * E)`` slots per layer) and rewritten in place.
"""

from __future__ import annotations

import math

import torch

from elastic_ep.eplb.placement import EMPTY, Placement, log2phy_from_phy2log


class PlacementBuffers:
    """Fixed-address ``phy2log``, ``log2phy`` and ``logcnt`` tensors, updated in place.

    Attributes:
        phy2log: int64 [L, capacity]; slots beyond the current placement read -1.
        log2phy: int64 [L, E, max_replicas]; -1 padded.
        logcnt: int64 [L, E].
        capacity: ``ceil(max_physical_factor * E)`` physical slots per layer.
        max_replicas: ``capacity - E + 1``, the most replicas one expert can have while every
            other expert keeps one.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical: int,
        max_physical_factor: float,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(num_logical, int) or num_logical < 1:
            raise ValueError(f"num_logical must be a positive int, got {num_logical!r}")
        if not isinstance(max_physical_factor, (int, float)) or not max_physical_factor >= 1.0:
            raise ValueError(f"max_physical_factor must be >= 1.0, got {max_physical_factor!r}")
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.max_physical_factor = float(max_physical_factor)
        self.capacity = math.ceil(self.max_physical_factor * num_logical)
        self.max_replicas = self.capacity - num_logical + 1
        self.phy2log = torch.full(
            (num_layers, self.capacity), EMPTY, dtype=torch.int64, device=device
        )
        self.log2phy = torch.full(
            (num_layers, num_logical, self.max_replicas), EMPTY, dtype=torch.int64, device=device
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
        if most > self.max_replicas:
            raise ValueError(
                f"placement gives one expert {most} replicas, but log2phy holds at most "
                f"{self.max_replicas} (max_physical_factor={self.max_physical_factor})"
            )

    def update_(self, placement: Placement) -> None:
        """Write ``placement`` into the buffers in place; unused capacity reads -1.

        Raises ``ValueError`` (buffers unchanged) if it does not fit.
        """
        self.check_fits(placement)
        phy2log = torch.full((self.num_layers, self.capacity), EMPTY, dtype=torch.int64)
        phy2log[:, : placement.num_slots] = placement.phy2log
        log2phy = log2phy_from_phy2log(
            placement.phy2log, self.num_logical, placement.logcnt, self.max_replicas
        )
        self.phy2log.copy_(phy2log, non_blocking=False)
        self.log2phy.copy_(log2phy)
        self.logcnt.copy_(placement.logcnt)
        self.num_slots = placement.num_slots
