"""``elastic-ep launch`` / ``scale`` / ``rebalance`` / ``status`` from the command line.

End to end: a real launcher process starts a tiny gloo engine (tests/launch_engine.py), the
client commands scale it up and down and rebalance it through the endpoint with the token, and
SIGTERM stops the job. Bad arguments are one-line errors with exit status 2.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from elastic_ep.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "launch-test-token-0123456789abcdef"
ENGINE = "tests.launch_engine:rank_main"


class Launched:
    """The launcher's process and its stdout lines, read on a thread (every wait is bounded)."""

    def __init__(self, *args: str, token: str | None = TOKEN) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("ELASTIC_EP_TOKEN", None)
        if token is not None:
            env["ELASTIC_EP_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elastic_ep", "launch", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def stop(self) -> None:
        """SIGTERM, then the launcher must log "stopped" and exit 0 (bounded; killed if not)."""
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.wait_for(r"stopped", timeout_s=60)
            assert self.proc.wait(timeout=60) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def wait_for(self, pattern: str, timeout_s: float = 120.0) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; saw {self.seen}") from None
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_launch_scale_rebalance_status_and_stop(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = Launched(
        "--entry", ENGINE, "--ranks", "2", "--max-ranks", "4", "--experts", "4", "--slots", "2",
        "--http", "127.0.0.1:0", "--config", '{"layers": 2, "experts": 4, "slots": 2}',
    )  # fmt: skip
    try:
        url = job.wait_for(r"control endpoint (http://\S+) \(bearer token required\)")[1]
        job.wait_for(r"serving 2 ranks, members \[0, 1\]")
        monkeypatch.setenv("ELASTIC_EP_TOKEN", TOKEN)
        monkeypatch.setenv("ELASTIC_EP_URL", url)

        code, out, _ = _run(capsys, "status")
        assert code == 0 and "world 2, members [0, 1]" in out

        code, out, err = _run(capsys, "scale", "3")
        assert code == 0, err
        assert "scale #1 started" in out and "completed" in out
        assert "world 3, members [0, 1, 2]" in out.splitlines()[-1]

        code, out, err = _run(capsys, "scale", "2", "--mode", "reject", "--timeout-s", "30")
        assert code == 0, err
        assert "world 2, members [0, 1]" in out.splitlines()[-1]

        code, out, err = _run(capsys, "rebalance")
        assert code == 0, err
        assert "last event rebalance #3" in out.splitlines()[-1]

        code, out, err = _run(capsys, "scale", "5")  # above --max-ranks: refused, nothing changes
        assert code == 2 and "HTTP 400" in err and "the maximum is 4" in err
        code, _, err = _run(capsys, "scale", "3", "--token", "not-the-token-but-long-enough")
        assert code == 2 and "HTTP 403" in err and err.count("\n") == 1
        monkeypatch.delenv("ELASTIC_EP_TOKEN")
        code, _, err = _run(capsys, "rebalance")
        assert code == 2 and "HTTP 401" in err and "--token" in err
        code, out, _ = _run(capsys, "status", "--json")
        assert code == 0 and '"world_size": 2' in out and '"event_id": 3' in out

    finally:
        job.stop()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LAUNCH = ["launch", "--entry", ENGINE, "--ranks", "2", "--max-ranks", "4"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["launch", "--entry", "no_such_pkg.mod:f", "--ranks", "1", "--max-ranks", "1"],
         "cannot import 'no_such_pkg.mod'"),
        (["launch", "--entry", "tests.launch_engine:nope", "--ranks", "1", "--max-ranks", "1"],
         "has no attribute 'nope'"),
        (["launch", "--entry", "tests.launch_engine", "--ranks", "1", "--max-ranks", "1"],
         "expected pkg.module:function"),
        (["launch", "--entry", "tests.launch_engine:WIDTH", "--ranks", "1", "--max-ranks", "1"],
         "is not callable"),
        ([*LAUNCH[:4], "3", "--max-ranks", "2"], "--max-ranks 2 is below --ranks 3"),
        ([*LAUNCH, "--experts", "4", "--slots", "1"], "world_size 2 gives 2 expert slots"),
        ([*LAUNCH, "--experts", "4"], "--experts and --slots together"),
        ([*LAUNCH, "--http", "localhost"], "expected HOST:PORT"),
        ([*LAUNCH, "--http", "127.0.0.1:99999"], "expected HOST:PORT"),
        ([*LAUNCH, "--http", "0.0.0.0:0"], "not loopback) without a token"),
        ([*LAUNCH, "--token", "short"], "at least 16 printable"),
        ([*LAUNCH, "--backend", "nccl"], "needs --devices"),
        ([*LAUNCH, "--devices", "2"], "--devices is for --backend nccl"),
        ([*LAUNCH, "--backend", "nccl", "--devices", "2"], "--devices 2 is below --max-ranks 4"),
        ([*LAUNCH, "--backend", "nccl", "--devices", "512"], "CUDA devices are visible"),
        ([*LAUNCH, "--config", "{bad"], "--config is not valid JSON"),
        (["scale", "3", "--url", "ftp://host:1"], "expected http://HOST:PORT"),
        (["status", "--url", "http://127.0.0.1:PORT"], "cannot reach http://127.0.0.1:"),
        (["scale", "3", "--url", "http://127.0.0.1:PORT"], "is `elastic-ep launch` running"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ELASTIC_EP_TOKEN", raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    argv = [a.replace("PORT", str(_closed_port())) for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scale", "zero"], "expected a positive integer, got 'zero'"),
        (["scale", "0"], "expected a positive integer, got 0"),
        (["scale", "2", "--mode", "later"], "invalid choice: 'later'"),
        (["rebalance", "--timeout-s", "inf"], "expected a positive number"),
        (["launch", "--ranks", "2"], "the following arguments are required"),
        (["nope"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and err.count("\n") == 1 and "see --help" in err


@pytest.mark.slow
def test_an_engine_that_crashes_ends_the_launch_with_one_line() -> None:
    job = Launched(
        "--entry", "tests.launch_engine:crash_main", "--ranks", "2", "--max-ranks", "2",
        "--http", "127.0.0.1:0",
    )  # fmt: skip
    try:
        assert job.proc.wait(timeout=120) == 2
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    job.wait_for(r"elastic_ep launch: error: initial members \[0, 1\] did not start", 10)
    assert any("failed to load its model" in line for line in job.seen)  # the rank's own error


@pytest.mark.slow
def test_insecure_launch_warns_and_serves(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--insecure`` on every interface without a token: the log says so, the endpoint serves."""
    monkeypatch.delenv("ELASTIC_EP_TOKEN", raising=False)
    job = Launched(
        "--entry", ENGINE, "--ranks", "2", "--max-ranks", "2", "--http", "0.0.0.0:0", "--insecure",
        token=None,
    )  # fmt: skip
    try:
        port = job.wait_for(r"control endpoint http://0\.0\.0\.0:(\d+) \(NO TOKEN: --insecure")[1]
        job.wait_for(r"serving 2 ranks")
        code, out, _ = _run(capsys, "status", "--url", f"http://127.0.0.1:{port}")
        assert code == 0 and "world 2" in out
    finally:
        job.stop()
