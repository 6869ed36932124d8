"""``python -m elastic_ep demo``: command-line options -> :class:`DemoConfig` -> run -> exit status."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import torch

from elastic_ep.demo.config import (
    CPU_EVENTS,
    CPU_INITIAL_RANKS,
    DemoConfig,
    TrafficConfig,
    default_script,
    parse_events,
)
from elastic_ep.demo.controller import run_demo
from elastic_ep.demo.plot import plot_timeline
from elastic_ep.moe import MoEModelConfig

SMALL_MODEL = MoEModelConfig(
    num_layers=2, num_experts=16, hidden_size=32, intermediate_size=32, top_k=2, seed=0
)
SMALL_SERVE_S = 0.5


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The run the options describe. Raises ``ValueError`` naming a bad option."""
    if args.backend == "nccl":
        if args.devices is None:
            raise ValueError("--backend nccl needs --devices N (one rank process per GPU)")
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.devices > visible:
            raise ValueError(f"--devices {args.devices}: only {visible} CUDA devices are visible")
        initial, script = default_script(args.devices)
    else:
        if args.devices is not None:
            raise ValueError("--devices is for --backend nccl (gloo ranks run on the CPU)")
        initial, script = CPU_INITIAL_RANKS, CPU_EVENTS
    base = DemoConfig()
    model = SMALL_MODEL if args.small else base.model
    model = dataclasses.replace(
        model,
        **{
            field: value
            for field, value in (
                ("num_layers", args.layers),
                ("num_experts", args.experts),
                ("hidden_size", args.hidden),
                ("intermediate_size", args.intermediate),
                ("top_k", args.top_k),
                ("seed", args.seed),
            )
            if value is not None
        },
    )
    traffic = TrafficConfig()
    if args.rate is not None:
        traffic = dataclasses.replace(traffic, requests_per_s=args.rate)
    if args.zipf is not None:
        traffic = dataclasses.replace(traffic, zipf_s=args.zipf)
    serve_s = (
        args.serve_s if args.serve_s is not None else SMALL_SERVE_S if args.small else base.serve_s
    )
    return DemoConfig(
        model=model,
        initial_ranks=args.ranks if args.ranks is not None else initial,
        events=parse_events(args.events if args.events is not None else script),
        slots_per_rank=args.slots,
        backend=args.backend,
        devices=args.devices,
        traffic=traffic,
        serve_s=serve_s,
        timeout_s=args.timeout_s if args.timeout_s is not None else base.timeout_s,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every check passed, 1 otherwise (2 comes from bad options)."""
    config = config_from_args(args)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'elastic_ep[plot]'")
    result = run_demo(config)
    if args.plot is not None:
        plot_timeline(result.rows, args.plot)
        print(f"wrote {args.plot}")
    return 0 if result.passed else 1
