"""The elastic demo: the CLI run end to end (real rank processes over gloo), its event script,
front end, traffic and timeline."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.cli import main
from elastic_ep.demo import (
    DemoConfig,
    DemoController,
    DemoEvent,
    EventKind,
    Requests,
    TimelineRow,
    TrafficConfig,
    default_script,
    format_timeline,
    parse_event,
    parse_events,
    plot_timeline,
    world_sizes,
)
from elastic_ep.demo.command import SMALL_MODEL
from elastic_ep.demo.controller import DemoResult
from elastic_ep.demo.frontend import FrontEnd
from elastic_ep.demo.traffic import SkewedTokens, probe_batch, probe_slice, zipf_weights
from elastic_ep.moe import MoEModelConfig, reference_forward, seeded_gate, topk_gating
from elastic_ep.scaling import GateMode, TrafficGate

ROOT = Path(__file__).resolve().parents[1]


def _run_python(args: list[str], timeout: float) -> str:
    """Run ``python *args`` in the repository root; assert it exits 0 and return its stdout."""
    run = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


# ---- the demo, end to end -------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_small_demo_passes_every_check_and_prints_the_timeline() -> None:
    out = _run_python(["-m", "elastic_ep", "demo", "--small"], timeout=170)
    assert out.rstrip().endswith("all 6 checks passed"), out
    # one correctness line per event, each within fp32 rounding
    lines = re.findall(r"-> (.+?): (\d+) ranks, .*max \|diff\| (\S+): check passed", out)
    assert [(e, int(n)) for e, n, _ in lines] == [
        ("rebalance", 4),
        ("scale 4->6 (drain)", 6),
        ("scale 6->3 (reject)", 3),
        ("kill rank 1 (member 1)", 2),
        ("scale 2->4 (drain)", 4),
    ], out
    assert all(float(d) <= 1e-4 for _, _, d in lines), lines
    table = [line for line in out.splitlines() if re.match(r"^\d+\s{2}", line)]
    assert len(table) == 6 and all(line.endswith("pass") for line in table), out
    # rebalancing visibly helps the skewed load; drain and reject modes both showed up
    before, after = (
        float(v) for v in re.search(r"rebalance.*?(\d\.\d+) -> (\d\.\d+)", table[1]).groups()
    )
    assert after > before
    all_lines = out.splitlines()
    header = re.split(r"\s{2,}", all_lines[all_lines.index(table[0]) - 2])
    cells = [dict(zip(header, re.split(r"\s{2,}", line), strict=True)) for line in table]
    # the rebalance went through the coordinator: staged phases and a blocking commit
    assert cells[1]["phases s"].split()[::2] == ["prep", "kv", "move", "commit"], cells[1]
    assert int(cells[2]["drained"]) + int(cells[2]["held"]) > 0  # the drain-mode scale up
    assert int(cells[3]["rejected"]) > 0  # the reject-mode scale down
    assert int(cells[4]["moved experts / bytes"].split("+")[1].split()[0]) > 0  # reloaded
    assert "recovering at" in out and "rebalancing at" in out  # progress of the phases


@pytest.mark.timeout(120)
def test_a_wrong_result_fails_the_check() -> None:
    """The check compares with a reference that does not match: it must report a failure."""
    config = DemoConfig(
        model=SMALL_MODEL, initial_ranks=2, events=parse_events("scale:3"), serve_s=0.3
    )
    lines: list[str] = []
    controller = DemoController(config, out=lines.append)
    other = dataclasses.replace(SMALL_MODEL, seed=1)  # a different model's answer
    traffic = config.traffic
    probe = probe_batch(
        SMALL_MODEL, traffic.zipf_s, traffic.noise, traffic.bias, config.probe_tokens
    )
    controller._reference = reference_forward(other, probe)
    result = controller.run()
    assert not result.passed
    assert result.summary() == "2 of 2 checks failed: #0 start, #1 scale 2->3 (drain)"
    assert all(row.ok and row.max_abs_diff > config.atol for row in result.rows)


def test_bad_options_exit_2_naming_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--events", "scale:4"], "already has 4 ranks"),
        (["--events", "kill:7"], "rank 7 does not exist"),
        (["--events", "scale:0"], "world size must be >= 1"),
        (["--events", "grow:5"], "bad event 'grow:5'"),
        (["--events", "scale:5:maybe"], "'drain' or 'reject'"),
        (["--events", "scale:2", "--slots", "8"], "minimum is 4"),
        (["--devices", "2"], "--devices is for --backend nccl"),
        (["--backend", "nccl"], "needs --devices"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--backend", "nccl", "--devices", "2"], "only 0 CUDA devices"))
    for argv, message in cases:
        assert main(["demo", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


# ---- the script ------------------------------------------------------------------------------
def test_parse_events() -> None:
    assert parse_events(" rebalance, scale:6 ,scale:3:REJECT,kill:1,") == (
        DemoEvent(EventKind.REBALANCE),
        DemoEvent(EventKind.SCALE, 6, GateMode.DRAIN),
        DemoEvent(EventKind.SCALE, 3, GateMode.REJECT),
        DemoEvent(EventKind.KILL, 1),
    )
    assert parse_events("") == ()
    for bad in ("scale", "scale:x", "kill:-1", "kill", "rebalance:2", "scale:3:drain:1"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_event(bad)
    with pytest.raises(TypeError):
        parse_events(None)  # type: ignore[arg-type]


events = st.one_of(
    st.just(DemoEvent(EventKind.REBALANCE)),
    st.builds(DemoEvent, st.just(EventKind.SCALE), st.integers(1, 12), st.sampled_from(GateMode)),
    st.builds(DemoEvent, st.just(EventKind.KILL), st.integers(0, 12)),
)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.lists(events, max_size=8))
def test_world_sizes_follow_the_script(initial: int, script: list[DemoEvent]) -> None:
    for event in script:
        assert parse_event(str(event)) == event  # the text form round-trips
    try:
        sizes = world_sizes(initial, tuple(script))
    except ValueError as exc:
        assert "event" in str(exc)
        return
    assert len(sizes) == len(script) + 1 and sizes[0] == initial
    for event, before, after in zip(script, sizes[:-1], sizes[1:], strict=True):
        if event.kind is EventKind.REBALANCE:
            assert after == before
        elif event.kind is EventKind.KILL:
            assert after == before - 1 and event.value is not None and event.value < before
        else:
            assert after == event.value != before


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 16), st.integers(2, 64))
def test_default_slots_hold_every_expert_at_every_size(devices: int, experts: int) -> None:
    initial, script = default_script(devices)
    model = MoEModelConfig(num_layers=1, num_experts=experts, hidden_size=8, intermediate_size=8)
    config = DemoConfig(
        model=model,
        initial_ranks=initial,
        events=parse_events(script),
        backend="nccl",
        devices=devices,
    )
    sizes = world_sizes(initial, config.events)
    assert max(sizes) == devices  # every GPU used, never more
    assert min(sizes) * config.slots >= experts
    assert config.limits.max_physical_slots == devices * config.slots
    kinds = {e.kind for e in config.events}
    assert kinds == set(EventKind)  # rebalance, scale and kill all appear


def test_bad_traffic_settings_are_refused() -> None:
    for field, value in (
        ("requests_per_s", 0.0),
        ("zipf_s", -1.0),
        ("decode_steps", 0),
        ("max_active", 2.5),
        ("noise", float("nan")),
    ):
        with pytest.raises(ValueError, match=field):
            TrafficConfig(**{field: value})


def test_default_script_needs_two_devices() -> None:
    with pytest.raises(ValueError, match="at least 2 devices"):
        default_script(1)
    with pytest.raises(ValueError, match="only 2 devices"):
        DemoConfig(initial_ranks=2, events=parse_events("scale:3"), backend="nccl", devices=2)


# ---- traffic --------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64), st.floats(0, 3), st.integers(0, 5), st.integers(0, 3))
def test_zipf_weights_are_a_permuted_zipf_law(
    experts: int, s: float, seed: int, layer: int
) -> None:
    w = zipf_weights(experts, s, seed, layer)
    assert w.shape == (experts,) and abs(float(w.sum()) - 1) < 1e-9
    expected = torch.arange(1, experts + 1, dtype=torch.float64).pow(-s)
    assert torch.allclose(w.sort(descending=True).values, expected / expected.sum())


def test_skewed_tokens_route_to_the_hot_experts() -> None:
    model = MoEModelConfig(num_layers=3, num_experts=32, hidden_size=64, intermediate_size=8)
    skewed = SkewedTokens(model, zipf_s=1.2, noise=0.25, bias=0.75, seed=3)
    uniform = SkewedTokens(model, zipf_s=0.0, noise=0.25, bias=0.75, seed=3)
    for layer in range(model.num_layers):
        gate = seeded_gate(model, layer)
        hot = int(skewed.popularity[layer].argmax())
        _, ids = topk_gating(skewed.sample(2000), gate, 2)
        share = float((ids == hot).any(1).float().mean())
        assert share > 0.2  # the hottest target's Zipf weight is about 0.27
        _, flat = topk_gating(uniform.sample(2000), gate, 2)
        assert float((flat == hot).any(1).float().mean()) < 0.12
    assert skewed.sample(0).shape == (0, 64)


@given(st.integers(1, 100), st.integers(1, 9))
def test_probe_slices_cover_the_batch_in_order(tokens: int, world: int) -> None:
    rows = [list(range(tokens))[probe_slice(tokens, r, world)] for r in range(world)]
    assert [i for row in rows for i in row] == list(range(tokens))


# ---- front end --------------------------------------------------------------------------------
def _wait_for(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_front_end_rejects_holds_and_drains_through_the_gate() -> None:
    gate = TrafficGate()
    front = FrontEnd(gate, requests_per_s=200.0, decode_steps=1, drain_wait_s=5.0)
    front.start()
    try:
        _wait_for(lambda: front.counts().admitted >= 5)
        gate.close(GateMode.REJECT, retry_after_s=1.0)
        _wait_for(lambda: front.counts().rejected >= 5)
        gate.close(GateMode.DRAIN, retry_after_s=1.0)
        in_flight = front.take(1000)
        for request in in_flight:  # work admitted before finishes while draining
            front.finish(request)
        assert gate.wait_drained(1.0)
        time.sleep(0.1)  # arrivals now wait at the gate
        waiting = front.counts()
        assert waiting.drained == len(in_flight) > 0 and waiting.in_flight == 0
        threading.Timer(0.05, gate.open).start()
        _wait_for(lambda: front.counts().held >= 5)
    finally:
        front.stop()
    counts = front.counts()
    assert counts.arrived == counts.admitted + counts.rejected  # the thread has stopped
    assert counts.in_flight == counts.admitted - counts.served > 0
    active = front.take(2)
    front.drop_all(active)  # the rank leaves: what it holds and what queues is lost
    after = front.counts()
    assert after.lost == counts.in_flight and after.in_flight == 0
    assert gate.in_flight == 0


# ---- timeline ---------------------------------------------------------------------------------
def _row(event: str, diff: float, ok: bool = True) -> TimelineRow:
    return TimelineRow(
        event=event,
        ok=ok,
        error=None if ok else "rolled_back: planner failed",
        world=3,
        end_to_end_s=0.25,
        blocking_s=0.01,
        phases=(("preparing", 0.1), ("committing", 0.01)),
        experts_moved=12,
        bytes_moved=3_000_000,
        reloaded=2,
        balance_before=0.8,
        balance_after=0.95,
        requests=Requests(served=10, drained=2, held=3, rejected=1, lost=0),
        max_abs_diff=diff,
        atol=1e-4,
    )


def test_timeline_table_and_summary() -> None:
    rows = (
        _row("start", 1e-7),
        _row("scale 2->3 (drain)", 1e-3),
        _row("scale 3->4", 0.0, ok=False),
    )
    table = format_timeline(rows).splitlines()
    assert table[0].split()[:3] == ["#", "event", "ranks"] and set(table[1]) <= {"-", " "}
    assert "prep 0.100 commit 0.010" in table[2] and "12 / 3.0 MB +2 reloaded" in table[2]
    assert "0.800 -> 0.950" in table[2]
    assert [line.split()[-1] for line in table[2:]] == ["pass", "FAIL", "FAIL"]
    result = DemoResult(rows)
    assert not result.passed
    assert result.summary() == "2 of 3 checks failed: #1 scale 2->3 (drain), #2 scale 3->4"
    assert DemoResult(rows[:1]).summary() == "all 1 checks passed"


def test_plot_writes_an_image_or_names_the_missing_package(tmp_path: Path) -> None:
    path = tmp_path / "timeline.png"
    rows = [_row("start", 1e-7), _row("rebalance", 2e-7)]
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ValueError, match="needs matplotlib"):
            plot_timeline(rows, path)
        assert not path.exists()
    else:
        plot_timeline(rows, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_small_demo_over_nccl_passes_every_check() -> None:
    """One rank process per GPU, NCCL groups, the script derived from the device count."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    devices = min(torch.cuda.device_count(), 4)
    stdout = _run_python(
        [
            "-m",
            "elastic_ep",
            "demo",
            "--small",
            "--backend",
            "nccl",
            "--devices",
            str(devices),
        ],
        timeout=290,
    )
    checks = 5 if devices == 2 else 6
    assert stdout.rstrip().endswith(f"all {checks} checks passed"), stdout
    assert f"{devices} GPUs, nccl" in stdout


# ---- the GPU scaling benchmark, tiny on CPU ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_scaling_runs_on_gloo_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    md = tmp_path / "performance.md"
    md.write_text("# Performance\n\nother sections stay\n")
    _run_python(
        [
            "benchmarks/bench_scaling.py",
            "--backend",
            "gloo",
            "--tiny",
            "--reps",
            "2",
            "--timeout-s",
            "5",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ],
        timeout=230,
    )
    result = json.loads(out.read_text())
    assert [e["event"] for e in result["events"]] == [
        "scale 3->4",
        "scale 4->3",
        "scale 3->4",
        "kill rank 1 (4->3)",
    ]
    for event in result["events"]:
        assert 0 < event["blocking_s"] <= event["end_to_end_s"]
        assert event["floor_s"] > 0 and event["experts_moved"] >= 0
    assert result["events"][0]["experts_moved"] > 0  # the joiner was filled
    assert result["events"][-1]["phases_s"].keys() == {"recovering"}
    assert result["floors"]["p2p_GBps"] > 0 and result["floors"]["build_warm_s"] > 0
    text = md.read_text()
    assert "other sections stay" in text and text.count("<!-- bench_scaling -->") == 2
    assert "| kill rank 1 (4->3) |" in text


@pytest.mark.slow
@pytest.mark.timeout(210)
def test_bench_executor_and_its_host_bench_run_on_cpu() -> None:
    out = _run_python(
        [
            "benchmarks/bench_executor.py",
            "--backend",
            "gloo",
            "--devices",
            "2",
            "--small",
            "--repeats",
            "1",
        ],
        timeout=140,
    )
    for scenario in ("reshuffle", "drift10", "up 1->2", "down 2->1"):
        assert scenario in out
    out = _run_python(
        ["benchmarks/bench_executor_host.py", "--device", "cpu", "--small", "--repeats", "1"],
        timeout=60,
    )
    assert "reshuffle torch" in out and "drift10   torch" in out


def test_bench_barrier_runs_on_gloo() -> None:
    out = _run_python(["benchmarks/bench_barrier.py", "--devices", "2", "--barriers", "20"], 120)
    rows = [line.split()[0] for line in out.splitlines()[2:]]
    assert rows == ["raw", "library", "raw"] and "raw / library:" in out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_connect_runs_on_gloo(tmp_path: Path) -> None:
    out = tmp_path / "connect.jsonl"
    _run_python(
        [
            "benchmarks/bench_connect.py",
            "--backend",
            "gloo",
            "--devices",
            "3",
            "--mb",
            "2",
            "--row-mb",
            "1",
            "--repeats",
            "1",
            "--stress",
            "2",
            "--json",
            str(out),
        ],
        timeout=170,
    )
    result = json.loads(out.read_text().splitlines()[-1])
    for step in ("build", "first_all_reduce", "first_all_to_all", "warm_all_to_all"):
        assert result[f"first_{step}"] > 0 and result[f"second_{step}"] > 0, result
    assert result["ring_gbps"] > 0 and result["a2a_one_message_gbps"] > 0
    assert result["a2a_per_row_messages_per_rank"] == 2 * 2 * 1  # 2 peers, 1 row each, both ways
    assert result["stress_rounds_done"] == 2 and result["stress_failures"] == []
