"""Sliding window of per-step expert loads, the planner's input.

Decision: the window stores LOGICAL counts (W, L, E). The layers count tokens per physical slot
while they route (that is what routing produces), and each count is folded onto the slot's
logical expert through ``phy2log`` at that moment, summing over replicas. The window therefore
keeps its meaning when the placement changes between steps (a rebalance or a scale event), and a
joining rank with a different slot count needs no conversion.

Every tensor has a fixed address (allocated once, updated in place), so recording can run inside
a captured CUDA graph. ``end_step`` and the readers run between steps, outside any graph.
Recording is gated by a flag on the device (``recording``), so a captured graph can be told to
stop or resume counting without a re-capture.
"""

from __future__ import annotations

from typing import Protocol

import torch

from elastic_ep.moe.routing import count_slot_tokens_


class SumReducer(Protocol):
    """What :meth:`LoadRecord.aggregate` needs of a group (e.g. a ``StatelessGroup``)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...


class LoadRecord:
    """Ring buffer of the last ``window`` steps' logical expert loads of this rank.

    Attributes:
        window: int32 [W, L, E] logical token counts of the last W steps (ring; unused rows 0).
        step_counts: int32 [L, E] counts of the step in progress, moved into ``window`` by
            :meth:`end_step`.
        slot_counts: int32 [L, capacity] counts per physical slot of the step in progress (the
            raw routing output; useful to see per-replica load). Reset by :meth:`end_step`.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical: int,
        capacity: int,
        window: int,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_logical", num_logical),
            ("capacity", capacity),
            ("window", window),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.capacity = capacity
        self.window = torch.zeros(window, num_layers, num_logical, dtype=torch.int32, device=device)
        self.step_counts = torch.zeros(num_layers, num_logical, dtype=torch.int32, device=device)
        self.slot_counts = torch.zeros(num_layers, capacity, dtype=torch.int32, device=device)
        self.recording = torch.ones(1, dtype=torch.int32, device=device)
        self._next_row = 0
        self._steps = 0

    @property
    def window_size(self) -> int:
        return int(self.window.shape[0])

    @property
    def steps_recorded(self) -> int:
        """Completed steps in the window (at most ``window_size``)."""
        return min(self._steps, self.window_size)

    def record_(self, layer: int, slot_ids: torch.Tensor, phy2log: torch.Tensor) -> None:
        """Count one layer's routed pairs into the current step.

        Args:
            layer: MoE layer index in ``[0, L)``.
            slot_ids: int64 [T, K] physical slots (-1 = not routed), each ``< capacity``.
            phy2log: int64 [capacity] this layer's slot -> logical expert map in effect for
                this routing (-1 = empty slot).
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if phy2log.shape != (self.capacity,):
            raise ValueError(f"phy2log must be [{self.capacity}], got {tuple(phy2log.shape)}")
        slots = torch.zeros(self.capacity, dtype=torch.int32, device=self.slot_counts.device)
        count_slot_tokens_(slots, slot_ids)
        slots *= self.recording != 0
        self.slot_counts[layer] += slots
        # Fold slots onto their logical experts; empty slots (-1) land in a dropped extra column.
        logical = torch.zeros(self.num_logical + 1, dtype=torch.int32, device=slots.device)
        logical.scatter_add_(0, phy2log + 1, slots)
        self.step_counts[layer] += logical[1:]

    def set_recording(self, on: bool) -> None:
        """Start (``True``) or stop counting routed pairs; written in place, between steps."""
        self.recording.fill_(1 if on else 0)

    def end_step(self) -> None:
        """Close the current step: move its counts into the window (oldest row overwritten)."""
        self.window[self._next_row].copy_(self.step_counts)
        self.step_counts.zero_()
        self.slot_counts.zero_()
        self._next_row = (self._next_row + 1) % self.window_size
        self._steps += 1

    def logical_load(self) -> torch.Tensor:
        """float32 [L, E]: this rank's tokens per logical expert summed over the window."""
        return self.window.sum(0, dtype=torch.int64).to(torch.float32)

    def aggregate(
        self, group: SumReducer, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """float32 [L, E]: window load summed over every rank of ``group`` (a collective).

        Args:
            group: e.g. the EP ``StatelessGroup``; every member must call this.
            device: where the all-reduce runs (default: the window's device; use ``"cpu"`` for a
                gloo group when the window is on a GPU).
        Returns:
            float32 [L, E] on the window's device.
        """
        total = self.window.sum(0, dtype=torch.int64)
        if device is not None:
            total = total.to(device)
        group.all_reduce(total)
        return total.to(self.window.device, torch.float32)

    def reset(self) -> None:
        """Forget every recorded step (e.g. after the planner consumed the window)."""
        self.window.zero_()
        self.step_counts.zero_()
        self.slot_counts.zero_()
        self._next_row = 0
        self._steps = 0
