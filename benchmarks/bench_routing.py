"""Route one MoE layer's top-k ids to replicas and record the load, on one GPU: our fused kernel,
our torch path and vLLM 0.33.0's ``_eplb_map_and_record_triton``, side by side in one run.

For each (experts E, top-k K, tokens T): a placement with ``E / 4`` extra slots given to the
hottest experts (at most 4 replicas each, 8 ranks), skewed loads (softmax of 1.5 x normal
logits), and 8 batches of top-k ids drawn from them. Each path maps logical ids to physical slots
and adds per-slot counts into a fixed-address buffer behind a device flag:

- ``kernel``: ``route_kernel.route_and_record`` under ``plan_launch``'s plans (one launch;
  ordinals from atomics, exact split), int32 ids like vLLM's, and int64 ids as the layer passes
  them;
- ``torch``: ``routing.route_to_slots`` then ``LoadRecord.record_`` (the CPU path, on CUDA);
- ``vllm``: vLLM's fused kernel (hash of the token index picks the replica), int32 ids.

Time per layer: 20 launches captured in a CUDA graph, replayed ``--repeats`` times, timed with
CUDA events (median per launch, batches rotated), so launch gaps are the GPU's, as in a
graph-captured decode step.
Imbalance: per batch, for every expert with 2+ replicas, max - min tokens over its replicas; the
table gives the largest over experts and batches.

vLLM's kernel is read from its wheel (never installed, never committed): ``--vllm`` takes the
wheel or ``vllm/model_executor/layers/fused_moe/router/base_router.py`` extracted from it. That
file imports vLLM, so the benchmark copies only the two functions' source (the Triton kernel and
its wrapper) into ``_vllm_eplb_kernel.py`` next to ``--vllm`` (Triton needs a file to read the
kernel's source from) and imports that:

    mkdir -p .carry/vllm_router && unzip -o -j .carry/wheels/vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl \\
        vllm/model_executor/layers/fused_moe/router/base_router.py -d .carry/vllm_router
    python benchmarks/bench_routing.py --vllm .carry/vllm_router/base_router.py [--repeats 50]

``--sweep``: instead of the table, every candidate launch plan (``candidate_plans``: per-pair
fetch-adds plain or warp-aggregated, counts per pair or tallied by the last program, counters
packed or one per line; sorted blocks of 128-2048 pairs) at every size beside vLLM's kernel: the
measurements behind ``route_plan.plan_launch``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import statistics
import sys
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from elastic_ep.eplb import Placement, PlacementBuffers
from elastic_ep.moe import LoadRecord, route_to_slots
from elastic_ep.moe import route_kernel as rk

ROUTER = "vllm/model_executor/layers/fused_moe/router/base_router.py"
FUNCTIONS = ("_eplb_map_and_record_i32_kernel", "_eplb_map_and_record_triton")
BATCHES = 8
LAUNCHES = 20
RANKS = 8
MAX_REPLICAS = 4


def load_vllm_kernel(path: Path) -> Callable[..., torch.Tensor]:
    """vLLM's ``_eplb_map_and_record_triton``, from its wheel or its ``base_router.py``."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            text = wheel.read(ROUTER).decode()
    else:
        text = path.read_text()
    found = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS:
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            lines = text.splitlines()[start - 1 : node.end_lineno]
            found[node.name] = textwrap.dedent("\n".join(lines))
    if set(found) != set(FUNCTIONS):
        raise ValueError(f"{path} lacks {sorted(set(FUNCTIONS) - set(found))}")
    module = path.with_name("_vllm_eplb_kernel.py")
    header = "import torch\nimport triton\nimport triton.language as tl\n\n\n"
    module.write_text(header + "\n\n\n".join(found[name] for name in FUNCTIONS) + "\n")
    spec = importlib.util.spec_from_file_location("_vllm_eplb_kernel", module)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    spec.loader.exec_module(loaded)
    return loaded._eplb_map_and_record_triton  # type: ignore[no-any-return]


def skewed_probs(gen: torch.Generator, experts: int) -> torch.Tensor:
    return torch.softmax(1.5 * torch.randn(experts, generator=gen), 0)


def replicated_placement(gen: torch.Generator, probs: torch.Tensor) -> Placement:
    """``E / 4`` extra slots to the experts with the most load per replica (at most 4 each),
    shuffled over ``RANKS`` ranks of equal size."""
    experts = probs.numel()
    replicas = torch.ones(experts, dtype=torch.int64)
    extra = experts // 4
    extra += (-(experts + extra)) % RANKS
    for _ in range(extra):
        share = torch.where(replicas < MAX_REPLICAS, probs / replicas, -1.0)
        replicas[int(share.argmax())] += 1
    phy2log = torch.repeat_interleave(torch.arange(experts), replicas)
    phy2log = phy2log[torch.randperm(phy2log.numel(), generator=gen)]
    return Placement(phy2log.unsqueeze(0), experts, RANKS)


def imbalance(
    slots: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, capacity: int
) -> int:
    """Largest max - min tokens over one expert's replicas, over experts with 2+ replicas."""
    per_slot = torch.bincount(slots.reshape(-1).long(), minlength=capacity)
    width = log2phy.shape[1]
    used = torch.arange(width, device=logcnt.device) < logcnt.unsqueeze(1)
    loads = per_slot[log2phy.clamp(min=0)]
    spread = torch.where(used, loads, -1).amax(1) - torch.where(used, loads, 1 << 40).amin(1)
    return int(spread[logcnt >= 2].max())


def graph_time_us(step: Callable[[int], object], repeats: int) -> float:
    """Median per-launch time of ``LAUNCHES`` calls captured in one CUDA graph (batch i % 8)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAUNCHES):
            step(i % BATCHES)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAUNCHES)
    return statistics.median(times)


@dataclass(frozen=True)
class Row:
    experts: int
    top_k: int
    tokens: int
    kernel_us: float
    kernel_i64_us: float
    vllm_us: float
    torch_us: float
    kernel_imbalance: int
    vllm_imbalance: int
    torch_imbalance: int


def measure(
    vllm: Callable[..., torch.Tensor],
    experts: int,
    top_k: int,
    tokens: int,
    repeats: int,
    device: str = "cuda",
    plan: rk.LaunchPlan | None = None,
    paths: tuple[str, ...] = ("kernel", "kernel_i64", "vllm", "torch"),
) -> Row:
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(experts * 100_003 + top_k * 101 + tokens)
    probs = skewed_probs(gen, experts)
    placement = replicated_placement(gen, probs)
    buffers = PlacementBuffers(1, experts, placement.num_slots / experts, device=dev)
    buffers.update_(placement)
    l2p, cnt = buffers.log2phy[0], buffers.logcnt[0]
    ids64 = [
        torch.multinomial(probs.expand(tokens, -1), top_k, generator=gen).to(dev)
        for _ in range(BATCHES)
    ]
    ids32 = [ids.to(torch.int32) for ids in ids64]
    record = LoadRecord(1, experts, buffers.capacity, 1, device=dev)
    scratch = rk.new_route_scratch(experts, dev)
    running = rk.running_counters(scratch, experts)
    load_view = torch.zeros(buffers.capacity, dtype=torch.int32, device=dev)

    def ours(ids: list[torch.Tensor]) -> Callable[[int], torch.Tensor]:
        return lambda i: rk.route_and_record(
            ids[i],
            l2p,
            cnt,
            scratch,
            rank_offset=3,
            slot_counts=record.slot_counts[0],
            expert_counts=record.step_counts[0],
            record_flag=record.recording,
            plan=plan,
        )

    def theirs(i: int) -> torch.Tensor:
        return vllm(ids32[i], l2p, cnt, load_view, record.recording, None)  # type: ignore[no-any-return]

    def torch_path(i: int) -> torch.Tensor:
        slots = route_to_slots(ids64[i], l2p, cnt, rank_offset=3)
        record.record_(0, slots, buffers.phy2log[0])
        return slots

    steps = {"kernel": ours(ids32), "kernel_i64": ours(ids64), "vllm": theirs, "torch": torch_path}
    steps = {name: step for name, step in steps.items() if name in paths}
    spread = dict.fromkeys(("kernel", "kernel_i64", "vllm", "torch"), -1)
    for name, step in steps.items():
        worst = 0
        for i in range(BATCHES):
            start = running.clone()
            slots = step(i)
            launch = plan or rk.plan_launch(ids64[i].numel(), experts)
            if name.startswith("kernel") and launch.running:
                reference = route_to_slots(ids64[i], l2p, cnt, rank_offset=3, start=start)
            else:
                reference = route_to_slots(ids64[i], l2p, cnt, rank_offset=3)
            if name != "vllm" and not torch.equal(
                torch.bincount(slots.reshape(-1).long(), minlength=buffers.capacity),
                torch.bincount(reference.reshape(-1), minlength=buffers.capacity),
            ):
                raise RuntimeError(f"{name}: per-slot counts differ from the reference")
            if not torch.equal(buffers.phy2log[0][slots.long()], ids64[i]):
                raise RuntimeError(f"{name}: a pair was routed to a slot of another expert")
            worst = max(worst, imbalance(slots, l2p, cnt, buffers.capacity))
        spread[name] = worst
    times = dict.fromkeys(spread, float("nan"))
    times.update({name: graph_time_us(step, repeats) for name, step in steps.items()})
    return Row(
        experts,
        top_k,
        tokens,
        times["kernel"],
        times["kernel_i64"],
        times["vllm"],
        times["torch"],
        spread["kernel"],
        spread["vllm"],
        spread["torch"],
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| E | top-k | tokens | kernel us | kernel/vLLM | vLLM us | torch us | kernel int64 us "
        "| imbalance kernel / vLLM / torch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.experts} | {r.top_k} | {r.tokens} | {r.kernel_us:.2f} | "
            f"{r.kernel_us / r.vllm_us:.2f} | {r.vllm_us:.2f} | {r.torch_us:.1f} | "
            f"{r.kernel_i64_us:.2f} | "
            f"{r.kernel_imbalance} / {r.vllm_imbalance} / {r.torch_imbalance} |"
        )
    return "\n".join(lines)


def candidate_plans(numel: int) -> dict[str, rk.LaunchPlan]:
    """Launch plans to try at ``numel`` pairs: per-pair fetch-adds (plain or warp-aggregated,
    counts per pair or tallied by the last program, counters cleared or running) and sorted
    blocks."""
    pairs, sorted_ = rk.Strategy.PAIRS, rk.Strategy.SORTED
    experts, every = rk.Tally.EXPERTS, rk.Tally.ALL
    one = max(32, 1 << (numel - 1).bit_length())
    if numel <= rk.SINGLE_PROGRAM_PAIRS:
        return {
            "pairs one": rk.LaunchPlan(pairs, one, one // 32),
            "pairs one tE": rk.LaunchPlan(pairs, one, one // 32, tally=experts),
            "pairs one run": rk.LaunchPlan(pairs, one, one // 32, running=True),
            "pairs one run agg": rk.LaunchPlan(pairs, one, one // 32, aggregate=True, running=True),
        }
    plans = {
        "pairs": rk.LaunchPlan(pairs, 256, 8),
        "pairs tE": rk.LaunchPlan(pairs, 256, 8, tally=experts),
        "pairs agg": rk.LaunchPlan(pairs, 256, 8, aggregate=True),
        "pairs agg tE": rk.LaunchPlan(pairs, 256, 8, aggregate=True, tally=experts),
        "pairs agg tA": rk.LaunchPlan(pairs, 256, 8, aggregate=True, tally=every),
    }
    for block in (128, 256, 512):
        plans[f"pairs run {block}"] = rk.LaunchPlan(pairs, block, block // 32, running=True)
        plans[f"pairs run agg {block}"] = rk.LaunchPlan(
            pairs, block, block // 32, aggregate=True, running=True
        )
    for block, warps in [(128, 4), (256, 8), (512, 8), (512, 16), (1024, 8), (2048, 16)]:
        plans[f"sorted {block}/{warps} tA"] = rk.LaunchPlan(sorted_, block, warps, tally=every)
    plans["sorted 512/8 tE"] = rk.LaunchPlan(sorted_, 512, 8, tally=experts)
    return plans


def sweep(
    vllm: Callable[..., torch.Tensor], sizes: list[tuple[int, int, int]], repeats: int
) -> list[dict[str, object]]:
    """Every candidate plan at every size beside vLLM; prints one line per size."""
    found = []
    for experts, top_k, tokens in sizes:
        numel = tokens * top_k
        times = {}
        vllm_us = float("nan")
        for name, plan in candidate_plans(numel).items():
            paths = ("kernel",) if times else ("kernel", "vllm")
            row = measure(vllm, experts, top_k, tokens, repeats, plan=plan, paths=paths)
            times[name] = row.kernel_us
            vllm_us = row.vllm_us if paths[-1] == "vllm" else vllm_us
        best = min(times, key=times.__getitem__)
        found.append(
            {
                "experts": experts,
                "top_k": top_k,
                "tokens": tokens,
                "vllm_us": vllm_us,
                "times": times,
            }
        )
        listed = " ".join(f"{name}={t:.2f}" for name, t in times.items())
        print(
            f"E={experts} k={top_k} T={tokens}: vllm {vllm_us:.2f}, best {best} {times[best]:.2f} "
            f"({times[best] / vllm_us:.2f}x) | {listed}",
            flush=True,
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm", type=Path, required=True, help="vLLM wheel or base_router.py")
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 256, 384])
    parser.add_argument("--top-k", type=int, nargs="+", default=[6, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument(
        "--sweep", action="store_true", help="every candidate launch plan instead of the table"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    vllm = load_vllm_kernel(args.vllm)
    sizes = [(e, k, t) for e in args.experts for k in args.top_k for t in args.tokens]
    if args.sweep:
        found = sweep(vllm, sizes, args.repeats)
        if args.json:
            args.json.write_text(json.dumps(found, indent=1))
        return
    rows = []
    for experts, top_k, tokens in sizes:
        rows.append(measure(vllm, experts, top_k, tokens, args.repeats))
        print(rows[-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(table(rows))


if __name__ == "__main__":
    main()
