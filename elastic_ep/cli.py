"""Command line: ``python -m elastic_ep <command>`` (also installed as ``elastic-ep``).

Commands: ``plan`` (a placement from a load file), ``demo``, ``launch`` (an elastic job of your
engine: :mod:`elastic_ep.launch`), and ``scale``/``rebalance``/``status`` (talk to a launched
job's endpoint: :mod:`elastic_ep.control_client`). Each command is one
``add_<name>_command(subparsers)`` function that registers its arguments and sets ``handler``;
list it in ``COMMANDS`` to enable it. Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from elastic_ep.eplb.placement import Placement
from elastic_ep.eplb.planner import as_load_array, plan_with_report
from elastic_ep.errors import ElasticEPError
from elastic_ep.rank_mapping import RankMapping

PLACEMENT_KEYS = ("phy2log", "log2phy", "logcnt")
"""Keys of a placement file (what ``plan --out`` writes); a load file has none of them."""


def _load_torch_file(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as err:  # unpickling, zip and format errors all mean "not a torch file"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a torch tensor file ({first})") from None


def _from_dict(path: Path, obj: dict, kind: str) -> object:
    is_placement = any(k in obj for k in PLACEMENT_KEYS)
    if kind == "load" and is_placement:
        raise ValueError(
            f"{path} is a placement file (keys {sorted(k for k in obj if k in PLACEMENT_KEYS)}), "
            "not a load matrix; pass it as --previous"
        )
    if kind == "placement" and not is_placement:
        raise ValueError(f"{path}: a placement file needs a 'phy2log' key, found {sorted(obj)}")
    key = "phy2log" if kind == "placement" else "load"
    if key in obj:
        return obj[key]
    tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        raise ValueError(f"{path}: a dict needs a '{key}' key")
    return tensors[0]


def read_matrix(path: Path, kind: str = "load") -> np.ndarray:
    """2-D array from a .npy, .pt (a tensor, or a dict with one) or .csv file.

    ``kind`` is ``"load"`` (an [L, E] load; a placement file is refused) or ``"placement"`` (a
    phy2log [L, R * S], e.g. the ``phy2log`` key of a file ``plan --out`` wrote). Every error is
    a ``ValueError`` naming the file.
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:  # a text or pickled file named .npy
            raise ValueError(f"{path}: not a numpy .npy array file ({err})") from None
    if suffix == ".csv":
        try:
            return np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as err:
            raise ValueError(f"{path}: not a comma-separated matrix ({err})") from None
    if suffix == ".pt":
        obj = _load_torch_file(path)
        if isinstance(obj, dict):
            obj = _from_dict(path, obj, kind)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, found {type(obj).__name__}")
        return obj.numpy()
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .npy, .pt or .csv)")


def _check_output_path(path: Path | None, option: str) -> None:
    """Refuse an output whose folder is missing before any work is done."""
    if path is None:
        return
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder, not a file")


def contiguous_placement(layers: int, experts: int, ranks: int, slots: int) -> Placement:
    """One replica per expert, rank r holding a contiguous block (a model without EPLB)."""
    block = -(-experts // ranks)
    local = np.arange(ranks)[:, None] * block + np.arange(slots)[None, :]
    local = np.where((np.arange(slots) < block)[None, :] & (local < experts), local, -1)
    phy2log = torch.from_numpy(np.tile(local.reshape(1, -1), (layers, 1)))
    return Placement(phy2log, experts, ranks)


def _run_plan(args: argparse.Namespace) -> int:
    _check_output_path(args.out, "--out")
    _check_output_path(args.plot, "--plot")
    try:
        load = as_load_array(read_matrix(args.load))
    except TypeError as err:
        raise TypeError(f"{args.load}: {err}") from None
    except ValueError as err:
        message = str(err)
        raise ValueError(
            message if str(args.load) in message else f"{args.load}: {message}"
        ) from None
    layers, experts = load.shape
    previous, mapping = None, None
    if args.previous is not None:
        matrix = read_matrix(args.previous, kind="placement")
        if matrix.dtype.kind not in "iu" and not np.array_equal(matrix, np.round(matrix)):
            raise ValueError(f"{args.previous}: phy2log must hold integer expert ids")
        phy2log = torch.from_numpy(matrix.astype(np.int64))
        if phy2log.dim() != 2 or phy2log.shape[1] % args.slots:
            raise ValueError(
                f"{args.previous}: phy2log must be [layers, old_ranks * {args.slots}], "
                f"got {tuple(phy2log.shape)}"
            )
        old_ranks = phy2log.shape[1] // args.slots
        previous = Placement(phy2log, experts, old_ranks)
        mapping = RankMapping.resize(old_ranks, args.ranks)
    start = time.perf_counter()
    report = plan_with_report(
        load,
        args.ranks,
        args.slots,
        num_groups=args.groups,
        num_nodes=args.nodes,
        previous=previous,
        rank_mapping=mapping,
        max_transfers=args.max_transfers,
    )
    elapsed = time.perf_counter() - start
    before = previous or contiguous_placement(layers, experts, args.ranks, args.slots)
    loads = torch.from_numpy(load)
    after = report.placement
    kind = "hierarchical" if args.nodes > 1 else "global"
    print(f"load         {args.load}: {layers} layers x {experts} experts")
    print(f"plan         {args.ranks} ranks x {args.slots} slots, {kind}")
    label = f"previous, {before.num_ranks} ranks" if previous else "one replica per expert"
    print(f"balancedness before {before.balancedness(loads):.4f} ({label})")
    print(f"             after  {after.balancedness(loads):.4f}")
    received = int(report.transfers.sum())
    share = 100.0 * received / (layers * after.num_slots)
    print(f"transfers    {received} expert weights received ({share:.1f}% of slots)")
    print(f"time         {elapsed * 1e3:.1f} ms")
    if args.out is not None:
        torch.save(
            {
                "phy2log": after.phy2log,
                "log2phy": after.log2phy,
                "logcnt": after.logcnt,
                "units": after.units,
                "num_ranks": after.num_ranks,
            },
            args.out,
        )
        print(f"wrote        {args.out}")
    if args.plot is not None:
        draw_heatmaps(before.rank_loads(loads), after.rank_loads(loads), args.plot)
        print(f"wrote        {args.plot}")
    return 0


def draw_heatmaps(before: torch.Tensor, after: torch.Tensor, path: Path) -> None:
    """Save per-rank load heatmaps ([L, R] each, float) side by side; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("--plot needs matplotlib: pip install 'elastic_ep[plot]'") from err
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    top = float(max(before.max(), after.max()))
    for ax, loads, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        image = ax.imshow(loads.numpy(), aspect="auto", vmin=0, vmax=top, cmap="viridis")
        ax.set_title(f"{title}: load per rank")
        ax.set_xlabel("rank")
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="load")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser("plan", help="plan an expert placement from a load matrix")
    cmd.add_argument("--load", type=Path, required=True, help="[L, E] load: .npy, .pt or .csv")
    cmd.add_argument("--ranks", type=int, required=True, help="number of ranks R")
    cmd.add_argument("--slots", type=int, required=True, help="expert slots per rank S")
    cmd.add_argument("--groups", type=int, default=1, help="expert groups (hierarchical)")
    cmd.add_argument("--nodes", type=int, default=1, help="nodes; > 1 keeps groups in a node")
    cmd.add_argument(
        "--previous",
        type=Path,
        help="current phy2log [L, old_ranks * S] (.pt/.npy/.csv); old ranks beyond --ranks "
        "are removed, new ones appended",
    )
    cmd.add_argument("--max-transfers", type=int, help="most weights received per layer")
    cmd.add_argument("--out", type=Path, help="write phy2log/log2phy/logcnt/units to this .pt file")
    cmd.add_argument("--plot", type=Path, help="draw per-rank load heatmaps to this image")
    cmd.set_defaults(handler=_run_plan)


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser(
        "demo",
        help="serve a seeded MoE model on N processes while it rebalances, scales and loses a rank",
        description="Elastic EP demo: rank processes serve skewed synthetic traffic while an event "
        "script runs; after every event the distributed forward is checked against a "
        "single-process reference. Exit 0 when every check passed. See docs/demo.md.",
    )
    cmd.add_argument(
        "--backend",
        choices=("gloo", "nccl"),
        default="gloo",
        help="gloo: CPU processes (default); nccl: one process per GPU",
    )
    cmd.add_argument("--devices", type=int, help="GPUs to use with --backend nccl")
    cmd.add_argument("--ranks", type=int, help="initial ranks (default 4 on CPU)")
    cmd.add_argument(
        "--events",
        help="comma-separated script of rebalance | scale:N[:drain|reject] | kill:RANK "
        "(default on CPU: rebalance,scale:6,scale:3:reject,kill:1,scale:4; with nccl it is "
        "derived from --devices)",
    )
    cmd.add_argument("--small", action="store_true", help="tiny sizes and short traffic (CI)")
    cmd.add_argument("--layers", type=int, help="MoE layers (default 4)")
    cmd.add_argument("--experts", type=int, help="experts per layer (default 32)")
    cmd.add_argument("--hidden", type=int, help="hidden size (default 64)")
    cmd.add_argument("--intermediate", type=int, help="expert intermediate size (default 64)")
    cmd.add_argument("--top-k", type=int, help="experts per token (default 2)")
    cmd.add_argument(
        "--slots",
        type=int,
        help="expert slots per rank (default: the fewest "
        "that hold every expert at the script's smallest world)",
    )
    cmd.add_argument("--seed", type=int, default=0, help="model seed")
    cmd.add_argument("--serve-s", type=float, help="seconds of traffic before each event")
    cmd.add_argument("--rate", type=float, help="requests per second arriving at each rank")
    cmd.add_argument("--zipf", type=float, help="Zipf exponent of expert popularity (0 = uniform)")
    cmd.add_argument("--timeout-s", type=float, help="group timeout (bounds failure detection)")
    cmd.add_argument("--plot", type=Path, help="draw the timeline to this image (matplotlib)")

    def run(args: argparse.Namespace) -> int:
        from elastic_ep.demo.command import run_from_args  # the demo's imports only when used

        return run_from_args(args)

    cmd.set_defaults(handler=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_endpoint_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--url", help="the control endpoint (default $ELASTIC_EP_URL, else http://127.0.0.1:8470)"
    )
    cmd.add_argument(
        "--token", help="bearer token (default $ELASTIC_EP_TOKEN; prefer the variable)"
    )


def add_launch_command(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser(
        "launch",
        help="start an elastic job of your engine: coordinator, ranks, control endpoint",
        description="Start --ranks processes of the engine function (called with its RankSpec), "
        "host the job's store and serve the control endpoint until Ctrl-C or SIGTERM. See "
        "docs/scaling.md (command line) and docs/security.md.",
    )
    cmd.add_argument("--entry", required=True, help="the rank's function, pkg.module:function")
    cmd.add_argument("--ranks", type=_positive_int, required=True, help="initial ranks")
    cmd.add_argument("--max-ranks", type=_positive_int, required=True, help="most ranks")
    cmd.add_argument("--experts", type=_positive_int, help="logical experts per layer E")
    cmd.add_argument(
        "--slots",
        type=_positive_int,
        help="expert slots per rank S (with --experts: scale refuses sizes that cannot hold E)",
    )
    cmd.add_argument("--config", help="JSON passed to every rank as spec.config")
    cmd.add_argument("--http", default="127.0.0.1:8470", help="HOST:PORT of the endpoint")
    cmd.add_argument(
        "--store",
        default="127.0.0.1:0",
        help="HOST:PORT the job's TCPStore binds (ranks connect to it; use the cluster's "
        "private interface across hosts)",
    )
    cmd.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    cmd.add_argument("--devices", type=_positive_int, help="GPUs, with --backend nccl")
    cmd.add_argument("--token", help="bearer token for POSTs (default $ELASTIC_EP_TOKEN)")
    cmd.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --http without a token (anyone reaching it can scale)",
    )
    cmd.add_argument(
        "--timeout-s", type=_positive_float, default=30.0, help="the ranks' group timeout"
    )

    def run(args: argparse.Namespace) -> int:
        from elastic_ep.launch import config_from_args, run_launch

        return run_launch(config_from_args(args))

    cmd.set_defaults(handler=run)


def _event_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--mode", choices=("drain", "reject"), default="drain", help="traffic gate")
    cmd.add_argument("--timeout-s", type=_positive_float, default=60.0, help="bound on the event")
    cmd.add_argument("--no-wait", action="store_true", help="return once the event has started")
    _add_endpoint_options(cmd)


def add_scale_command(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser("scale", help="scale a running job to N ranks")
    cmd.add_argument("world_size", type=_positive_int, help="the new number of ranks")
    _event_options(cmd)

    def run(args: argparse.Namespace) -> int:
        from elastic_ep.control_client import Endpoint, run_event

        body = {"world_size": args.world_size, "mode": args.mode, "timeout_s": args.timeout_s}
        endpoint = Endpoint.from_args(args.url, args.token)
        return run_event(endpoint, "/scale", body, wait=not args.no_wait)

    cmd.set_defaults(handler=run)


def add_rebalance_command(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser("rebalance", help="re-plan a running job's expert placement")
    _event_options(cmd)

    def run(args: argparse.Namespace) -> int:
        from elastic_ep.control_client import Endpoint, run_event

        body = {"mode": args.mode, "timeout_s": args.timeout_s}
        endpoint = Endpoint.from_args(args.url, args.token)
        return run_event(endpoint, "/rebalance", body, wait=not args.no_wait)

    cmd.set_defaults(handler=run)


def add_status_command(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser("status", help="print a running job's elastic state")
    cmd.add_argument("--json", action="store_true", help="print the JSON as the endpoint sends it")
    _add_endpoint_options(cmd)

    def run(args: argparse.Namespace) -> int:
        from elastic_ep.control_client import Endpoint, describe

        status = Endpoint.from_args(args.url, args.token).call("GET", "/status")
        print(json.dumps(status) if args.json else describe(status))
        return 0

    cmd.set_defaults(handler=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_plan_command,
    add_demo_command,
    add_launch_command,
    add_scale_command,
    add_rebalance_command,
    add_status_command,
]


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr (``prog: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elastic_ep", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 with a one-line message on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, OSError, ElasticEPError) as err:
        print(f"elastic_ep {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elastic_ep {args.command}: interrupted", file=sys.stderr)
        return 130
