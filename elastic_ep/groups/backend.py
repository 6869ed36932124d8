"""Construct a torch ProcessGroup outside torch's group registry (gloo or NCCL).

This is what vLLM's stateless groups do: build the backend object directly on a store, wrap it in
a ``ProcessGroup`` and register it for its device type. The result works with
``torch.distributed.all_reduce(t, group=pg)`` and friends, but not with the helpers that look a
group up in torch's registry (P2POp / batch_isend_irecv, broadcast_object_list): the
StatelessGroup methods cover those.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from enum import Enum
from typing import Any

import torch
from torch.distributed import ProcessGroup, Store


class Backend(str, Enum):
    """Communication backends a StatelessGroup can run on."""

    GLOO = "gloo"
    NCCL = "nccl"

    @classmethod
    def parse(cls, backend: str) -> Backend:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        try:
            return cls(backend.lower())
        except ValueError:
            raise ValueError(
                f"unknown backend {backend!r}; expected one of {[b.value for b in cls]}"
            ) from None

    @property
    def device_type(self) -> str:
        return "cpu" if self is Backend.GLOO else "cuda"


def default_device(backend: Backend) -> torch.device:
    """CPU for gloo; the current CUDA device for NCCL."""
    if backend is Backend.GLOO:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available")
    return torch.device("cuda", torch.cuda.current_device())


@functools.lru_cache(maxsize=1)
def _gloo_devices() -> tuple[object, ...]:
    # Same rule as torch.distributed: GLOO_SOCKET_IFNAME (comma separated) picks the interfaces;
    # otherwise gloo resolves this host's name. Devices are stateless and reusable, so build once.
    from torch.distributed import ProcessGroupGloo

    ifnames = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifnames:
        return tuple(
            ProcessGroupGloo.create_device(interface=name) for name in ifnames.split(",") if name
        )
    return (ProcessGroupGloo.create_default_device(),)


WATCHDOG_FACTOR = 2
"""torch's NCCL watchdog times a work out after this many times the group's ``timeout_s``."""


def make_process_group(
    store: Store,
    rank: int,
    world_size: int,
    backend: Backend,
    device: torch.device,
    timeout_s: float,
    build_timeout_s: float,
    group_name: str,
) -> ProcessGroup:
    """Build a ProcessGroup of one backend on ``store``; operations time out after ``timeout_s``
    (gloo's own timeout; NCCL's watchdog after ``WATCHDOG_FACTOR`` times it).

    gloo connects its full mesh inside the constructor, waiting for every peer up to
    ``build_timeout_s``; NCCL creates its communicator here (eagerly) and connects peers at the
    first collective. Call it for NCCL only once every rank has arrived: NCCL's communicator
    init has no timeout of its own.
    """
    timeout = timedelta(seconds=timeout_s)
    pg = ProcessGroup(store, rank, world_size)
    impl: Any  # ProcessGroupGloo or ProcessGroupNCCL (torch's stubs type them apart)
    if backend is Backend.GLOO:
        from torch.distributed import ProcessGroupGloo

        gloo_opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in torch's stubs
        gloo_opts._timeout = timedelta(seconds=build_timeout_s)
        gloo_opts._devices = list(_gloo_devices())
        impl = ProcessGroupGloo(store, rank, world_size, gloo_opts)
        impl.set_timeout(timeout)
        backend_type = ProcessGroup.BackendType.GLOO
    else:
        from torch.distributed import ProcessGroupNCCL

        # On a timeout, abort the communicator and fail the work instead of killing the process
        # (torch's default, 3 = SkipCleanUp, would end every survivor of a dead peer).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        # NCCL (2.19+) connects peers through cuMem-exported buffers by default. A fresh 4-rank
        # communicator on H200 then took 1.16 s for its first all-to-all and 0.33 s for its
        # first all-reduce; with the legacy CUDA IPC path 0.14 s and 9 ms, at the same bandwidth
        # (benchmarks/bench_connect.py). Every scale builds communicators, so the library turns
        # cuMem off unless the user set it (vLLM does the same). NCCL reads it once per process,
        # at its first communicator: an engine that made one before should export it itself.
        os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
        nccl_opts = ProcessGroupNCCL.Options()
        # torch's watchdog is the backstop, not the bound: the group's own timed waits come
        # first, abort the communicator and raise PeerFailure. A watchdog that fired first
        # began a debug dump that held the next abort of the group for a minute (2x H200).
        nccl_opts._timeout = timeout * WATCHDOG_FACTOR
        # Communication kernels ahead of queued compute blocks: the executor's copies (and an
        # engine's kernels) would otherwise fill the SMs and hold a transfer's launch back.
        nccl_opts.is_high_priority_stream = True
        impl = ProcessGroupNCCL(store, rank, world_size, nccl_opts)
        backend_type = ProcessGroup.BackendType.NCCL
    pg._set_default_backend(backend_type)
    impl._set_sequence_number_for_group()
    pg._register_backend(torch.device(device.type), backend_type, impl)
    pg._set_group_name(group_name)  # type: ignore[arg-type]  # a NewType only in newer stubs
    if backend is Backend.NCCL:
        # Create the communicator here (collective, no GPU work) rather than in the first
        # collective: a group built with connect=False on a background thread then launches
        # nothing on the GPU until the serving thread uses it.
        impl.eager_connect_single_device(device)
    return pg
