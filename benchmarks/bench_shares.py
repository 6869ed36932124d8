"""Routing shares: balancedness with and without them, vLLM's DefaultEplbPolicy beside, and the
share solver's part of the plan time.

    python benchmarks/bench_shares.py [--vllm-wheel PATH]

Loads: per layer a permuted Zipf profile ``1000 / i^s``. Cells: fresh global plans of 58 layers x
256 experts on 32 x 9, 32 x 10 and 64 x 5 slots (Zipf 1.1 to 1.5) and 26 x 64 on 32 x 3; each
with ``shares=False`` (2 swap steps, the default before 8, and 8), with shares (the default) and
vLLM's policy, balancedness per placement
(``Placement.balancedness``, which weighs replicas by their shares). Time: CPU time per plan at
58 x 256 on 1024 ranks x 1, 3 and 9 slots with and without shares, and of ``solve_shares``
alone (median of 5), one torch thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from elastic_ep.adapters.vllm import load_policy_modules
from elastic_ep.eplb import Placement, plan
from elastic_ep.eplb.placement import max_units
from elastic_ep.eplb.shares import solve_shares

CELLS = [  # experts, layers, ranks, slots, Zipf exponent
    (256, 58, 32, 9, 1.1),
    (256, 58, 32, 9, 1.2),
    (256, 58, 32, 9, 1.5),
    (256, 58, 32, 10, 1.5),
    (256, 58, 64, 5, 1.1),
    (64, 26, 32, 3, 1.1),
]
TIMED = [(256, 58, 1024, 1), (256, 58, 1024, 3), (256, 58, 1024, 9)]


def zipf(layers: int, experts: int, exponent: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    profile = 1000.0 / np.arange(1, experts + 1) ** exponent
    return np.stack([rng.permutation(profile) for _ in range(layers)])


def cpu_ms(fn: object, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()  # type: ignore[operator]
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-wheel", type=Path, help="vLLM wheel to read the policy from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wheel = args.vllm_wheel or next(iter(sorted(Path(".carry/wheels").glob("vllm-*.whl"))), None)
    _, default, version = load_policy_modules(wheel)
    policy = default.DefaultEplbPolicy
    print(f"vLLM {version}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print(
        "| E x L | ranks x slots | Zipf | even split, 2 swap steps | even split | shares | vLLM "
        "| shares - vLLM |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for experts, layers, ranks, slots, exponent in CELLS:
        load = zipf(layers, experts, exponent)
        weight = torch.from_numpy(load)
        two = plan(load, ranks, slots, shares=False, swap_steps=2).balancedness(weight)
        even = plan(load, ranks, slots, shares=False).balancedness(weight)
        ours = plan(load, ranks, slots).balancedness(weight)
        phy2log = policy.rebalance_experts(weight, ranks * slots, 1, 1, ranks)
        theirs = Placement(phy2log.to(torch.int64), experts, ranks).balancedness(weight)
        print(
            f"| {experts} x {layers} | {ranks} x {slots} | {exponent} | {two:.4f} | {even:.4f} "
            f"| {ours:.4f} "
            f"| {theirs:.4f} | {ours - theirs:+.5f} |"
        )
    print("\n| E x L | ranks x slots | plan, even ms | plan, shares ms | solve_shares ms |")
    print("|---|---|---:|---:|---:|")
    for experts, layers, ranks, slots in TIMED:
        load = zipf(layers, experts, 1.1)
        grid = plan(load, ranks, slots, shares=False).phy2log.numpy().reshape(layers, ranks, -1)
        most = max_units(ranks * slots, experts)
        even_ms = cpu_ms(lambda load=load, r=ranks, s=slots: plan(load, r, s, shares=False))
        shares_ms = cpu_ms(lambda load=load, r=ranks, s=slots: plan(load, r, s))
        solver_ms = cpu_ms(lambda g=grid, load=load, m=most: solve_shares(g, load, m))
        print(
            f"| {experts} x {layers} | {ranks} x {slots} | {even_ms:.1f} | {shares_ms:.1f} "
            f"| {solver_ms:.1f} |"
        )
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
