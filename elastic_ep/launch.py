"""``elastic-ep launch``: start an elastic job of the user's engine from the command line.

The launcher process hosts the job (an :class:`~elastic_ep.scaling.ElasticCoordinator` with its
TCPStore), starts ``--ranks`` rank processes and serves the control endpoint
(:class:`~elastic_ep.scaling.ControlServer`) until SIGINT or SIGTERM, then stops every rank
(bounded) and exits. ``elastic-ep scale``/``rebalance``/``status`` (:mod:`elastic_ep.control_client`)
talk to that endpoint.

A rank process runs the user's ``pkg.module:function`` with its
:class:`~elastic_ep.scaling.RankSpec` (``spec.config`` is the ``--config`` JSON, or ``None``),
the same entry :class:`~elastic_ep.scaling.LocalProcessLauncher` takes; typically it builds an
:class:`~elastic_ep.scaling.ElasticRank` and serves until ``poll()`` says leave or stop. Before the
call the process's environment carries ``ELASTIC_EP_BACKEND`` (``gloo``/``nccl``) and
``ELASTIC_EP_DEVICE`` (``cpu``, or ``cuda:i``: the lowest-numbered of ``--devices`` GPUs that no
live rank process holds, already made the current CUDA device).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elastic_ep.scaling import (
    ControlServer,
    ElasticCoordinator,
    LocalProcessLauncher,
    RankHandle,
    RankSpec,
    ScaleLimits,
)
from elastic_ep.scaling.server import is_loopback

DEFAULT_HTTP = "127.0.0.1:8470"
"""Where ``launch`` serves the endpoint and the client commands look for it by default."""
BACKEND_ENV = "ELASTIC_EP_BACKEND"
DEVICE_ENV = "ELASTIC_EP_DEVICE"


def parse_host_port(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{option} {text!r}: expected HOST:PORT with a port 0..65535")
    return host, int(port)


def resolve_entry(ref: str) -> Callable[[RankSpec], Any]:
    """Import ``pkg.module:function`` and return the function (``ValueError`` if it cannot)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--entry {ref!r}: expected pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--entry {ref!r}: cannot import {module_name!r}: {err}") from None
    entry: Any = module
    for part in attr.split("."):
        entry = getattr(entry, part, None)
        if entry is None:
            raise ValueError(f"--entry {ref!r}: {module_name} has no attribute {attr!r}")
    if not callable(entry):
        raise ValueError(f"--entry {ref!r}: {attr} is not callable")
    return entry


@dataclass(frozen=True)
class _Launched:
    """What a rank process needs besides the user's config (replaced by it before the call)."""

    entry: str
    backend: str
    device: str
    config: Any


def run_rank(spec: RankSpec) -> None:
    """A rank process: set the device and the environment, then call the user's entry."""
    launched: _Launched = spec.config
    os.environ[BACKEND_ENV] = launched.backend
    os.environ[DEVICE_ENV] = launched.device
    if launched.device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(launched.device))
    entry = resolve_entry(launched.entry)
    entry(dataclasses.replace(spec, config=launched.config))


class EntryLauncher:
    """A :class:`~elastic_ep.scaling.Launcher` of ``pkg.module:function`` ranks, one per device.

    Raises:
        RuntimeError: on ``nccl``, when every GPU is held by a live rank process.
    """

    def __init__(self, entry: str, backend: str, devices: int | None) -> None:
        self._entry = entry
        self._backend = backend
        self._devices = devices
        self._launcher = LocalProcessLauncher(run_rank)
        self._holders: dict[int, RankHandle] = {}

    def _free_gpu(self) -> int:
        for index in range(self._devices or 0):
            holder = self._holders.get(index)
            if holder is None or not holder.is_alive():
                return index
        raise RuntimeError(f"all {self._devices} GPUs are held by live rank processes")

    def launch(self, spec: RankSpec) -> RankHandle:
        index = self._free_gpu() if self._backend == "nccl" else -1
        device = f"cuda:{index}" if index >= 0 else "cpu"
        launched = _Launched(self._entry, self._backend, device, spec.config)
        handle = self._launcher.launch(dataclasses.replace(spec, config=launched))
        if index >= 0:
            self._holders[index] = handle
        return handle


@dataclass(frozen=True)
class LaunchConfig:
    """The ``launch`` command's options, checked (``ValueError`` naming the option at fault)."""

    entry: str
    ranks: int
    limits: ScaleLimits
    http: tuple[str, int]
    store: tuple[str, int]
    backend: str = "gloo"
    devices: int | None = None
    config: Any = None
    token: str | None = None
    insecure: bool = False
    timeout_s: float = 30.0
    start_timeout_s: float = 120.0


def config_from_args(args: Any) -> LaunchConfig:
    """Check ``launch``'s options and import the entry once here (a typo fails at once)."""
    resolve_entry(args.entry)
    if args.max_ranks < args.ranks:
        raise ValueError(f"--max-ranks {args.max_ranks} is below --ranks {args.ranks}")
    if (args.experts is None) != (args.slots is None):
        raise ValueError("give --experts and --slots together (or neither)")
    if args.experts is None:
        limits = ScaleLimits(1, 1, args.max_ranks)
    else:
        limits = ScaleLimits(args.experts, args.slots, args.max_ranks * args.slots)
        limits.check_world_size(args.ranks)
    if args.backend == "nccl":
        if args.devices is None:
            raise ValueError("--backend nccl needs --devices N (one rank process per GPU)")
        if args.devices < args.max_ranks:
            raise ValueError(f"--devices {args.devices} is below --max-ranks {args.max_ranks}")
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.devices > visible:
            raise ValueError(f"--devices {args.devices}: only {visible} CUDA devices are visible")
    elif args.devices is not None:
        raise ValueError("--devices is for --backend nccl (gloo ranks run on the CPU)")
    config = None
    if args.config is not None:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config is not valid JSON: {err}") from None
    return LaunchConfig(
        entry=args.entry,
        ranks=args.ranks,
        limits=limits,
        http=parse_host_port(args.http, "--http"),
        store=parse_host_port(args.store, "--store"),
        backend=args.backend,
        devices=args.devices,
        config=config,
        token=args.token,
        insecure=args.insecure,
        timeout_s=args.timeout_s,
    )


def run_launch(cfg: LaunchConfig, stop: threading.Event | None = None) -> int:
    """Start the job and the endpoint, serve until ``stop`` is set (or SIGINT/SIGTERM)."""
    stop = stop or threading.Event()
    coord = ElasticCoordinator(
        EntryLauncher(cfg.entry, cfg.backend, cfg.devices),
        cfg.limits,
        host=cfg.store[0],
        port=cfg.store[1] or None,
        config=cfg.config,
        timeout_s=cfg.timeout_s,
    )
    try:
        # bound (and checked: token, loopback) before any rank starts; until the ranks serve,
        # /status says so and a scale is refused (409)
        server = ControlServer(coord, *cfg.http, token=cfg.token, allow_insecure=cfg.insecure)
    except BaseException:
        coord.shutdown(timeout_s=5)
        raise
    try:
        server.start()
        if server.has_token:
            auth = "bearer token required"
        elif is_loopback(cfg.http[0]):
            auth = "no token (loopback only)"
        else:
            auth = "NO TOKEN: --insecure, anyone who reaches this port can scale the job"
        say(f"control endpoint {server.url} ({auth})")
        store_host, store_port = coord.store_address
        say(
            f"starting {cfg.ranks} ranks of {cfg.entry} ({cfg.backend}), "
            f"store {store_host}:{store_port}"
        )
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        status = coord.start(cfg.ranks, timeout_s=cfg.start_timeout_s)
        say(f"serving {status.world_size} ranks, members {list(status.members)}; Ctrl-C stops")
        while not stop.wait(0.2):
            pass
        say("stopping")
    finally:
        server.stop()
        coord.shutdown(timeout_s=cfg.timeout_s)
    say("stopped")
    return 0


def say(line: str) -> None:
    """One line of the launcher's log, flushed (a supervisor reads it as it comes)."""
    print(f"elastic-ep launch: {line}", flush=True)
