"""Seeded fault sweep: random world sizes, scales and faults at random phases, on test hosts.

Each trial (elastic_ep.testing.fault_trial) starts a toy job of 2-5 ranks on 3 test hosts
(network namespaces; the coordinator and its store on host 0; hierarchical placement with the
hosts as nodes where the ranks allow it), scales it to a random size (or not, for a fault while
serving), waits for a random phase and injects one fault into a random member: SIGKILL,
SIGSTOP, a partition of its host (the link stays down) or a 2 s flap of it. Outcomes are
tabulated; every hang, wrong weight or crash is printed with its seed, and every trial's
settling time is compared with its documented bound.

    sudo PYTHONPATH=$PWD python benchmarks/fault_sweep.py --trials 200 --seed 0

Needs root and iproute2 (network namespaces). Replay one trial with ``--only SEED``.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import time

from elastic_ep.testing.fault_trial import (
    Outcome,
    Trial,
    bound_s,
    random_trial,
    run_on_test_hosts,
)
from elastic_ep.testing.netns import unavailable_reason

FAULTS = ("sigkill", "sigstop", "partition", "flap")
BAD = (Outcome.HANG.value, Outcome.WRONG_DATA.value, Outcome.CRASH.value)


def sweep(seeds: list[int], chunk: int) -> list[dict]:
    records = []
    for start in range(0, len(seeds), chunk):
        trials = [random_trial(s) for s in seeds[start : start + chunk]]
        for record in run_on_test_hosts(trials, hosts=3):
            records.append(record)
            t = record["trial"]
            line = (
                f"seed {t['seed']:5d} world {t['world']}->{t['target']} {t['fault']:9s} "
                f"member {t['victim']} at {t['phase']:11s} +{t['after_s']:.2f}s: "
                f"{record['outcome']:13s} settled {record.get('settle_s', float('nan')):6.2f} s"
            )
            if record["outcome"] in BAD:
                line += f"  FAILURE seed {t['seed']}: {record.get('detail')}"
            print(line, flush=True)
    return records


def table(records: list[dict]) -> str:
    """The markdown table: outcomes per fault, and the worst settling time against its bound."""
    outcomes = [o.value for o in Outcome]
    by_fault: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    worst: dict[str, float] = collections.defaultdict(float)
    over = 0
    for r in records:
        fault = r["trial"]["fault"]
        by_fault[fault][r["outcome"]] += 1
        settle = r.get("settle_s")
        if settle is not None:
            worst[fault] = max(worst[fault], settle)
            over += settle > bound_s(Trial(**r["trial"]))
    lines = [
        "| fault | trials | "
        + " | ".join(o.replace("_", " ") for o in outcomes)
        + " | worst settle (s) |",
        "|---" * (len(outcomes) + 3) + "|",
    ]
    total: collections.Counter[str] = collections.Counter()
    for fault in FAULTS:
        c = by_fault[fault]
        total.update(c)
        cells = " | ".join(str(c[o]) for o in outcomes)
        lines.append(f"| {fault} | {sum(c.values())} | {cells} | {worst[fault]:.1f} |")
    cells = " | ".join(str(total[o]) for o in outcomes)
    lines.append(
        f"| all | {sum(total.values())} | {cells} | {max(worst.values(), default=0):.1f} |"
    )
    lines.append("")
    lines.append(f"Trials past their bound: {over}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="first trial seed")
    parser.add_argument("--only", type=int, help="run only this trial seed")
    parser.add_argument("--chunk", type=int, default=25, help="trials per test network")
    parser.add_argument("--json", help="write every trial's record here")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"fault_sweep needs test hosts: {reason}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like an exception, so the test network is torn down (its processes too)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seeds = (
        [args.only] if args.only is not None else list(range(args.seed, args.seed + args.trials))
    )
    began = time.monotonic()
    records = sweep(seeds, args.chunk)
    print()
    print(table(records))
    print(f"\n{len(records)} trials in {time.monotonic() - began:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    failures = [r for r in records if r["outcome"] in BAD]
    for r in failures:
        print(f"FAILURE seed {r['trial']['seed']}: {r['outcome']}: {r.get('detail')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
