"""``python -m elastic_ep plan``: file formats, outputs, errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elastic_ep.cli import main
from elastic_ep.eplb import Placement
from tests.test_planner import make_load


@pytest.fixture
def load_file(tmp_path: Path) -> Path:
    path = tmp_path / "load.npy"
    np.save(path, make_load("lognormal", 4, 32, seed=1))
    return path


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".pt"])
def test_plan_reads_every_format_and_writes_placement(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    load = make_load("zipf", 3, 16, seed=2)
    path = tmp_path / f"load{suffix}"
    if suffix == ".npy":
        np.save(path, load)
    elif suffix == ".csv":
        np.savetxt(path, load, delimiter=",")
    else:
        torch.save({"load": torch.from_numpy(load)}, path)
    out = tmp_path / "placement.pt"
    assert (
        main(["plan", "--load", str(path), "--ranks", "4", "--slots", "5", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "3 layers x 16 experts" in text
    assert (
        "balancedness before" in text and "after" in text and "transfers" in text and "ms" in text
    )
    saved = torch.load(out, weights_only=True)
    placement = Placement(saved["phy2log"], 16, saved["num_ranks"], units=saved["units"])
    placement.validate(distinct_ranks=True)
    assert torch.equal(saved["logcnt"], placement.logcnt)
    assert torch.equal(saved["log2phy"], placement.log2phy)
    after = float(text.split("after")[1].split()[0])
    assert after == pytest.approx(placement.balancedness(torch.from_numpy(load)), abs=1e-4)


def test_plan_with_previous_reports_transfers(
    tmp_path: Path, load_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first.pt"
    assert (
        main(
            ["plan", "--load", str(load_file), "--ranks", "4", "--slots", "10", "--out", str(first)]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "plan",
                "--load",
                str(load_file),
                "--ranks",
                "5",
                "--slots",
                "10",
                "--previous",
                str(first),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "(previous, 4 ranks)" in text
    received = int(text.split("transfers")[1].split()[0])
    assert 0 < received < 4 * 5 * 10  # scale-up: fills the new rank, keeps most of the rest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ranks", "2", "--slots", "3"], "cannot hold 32 experts"),
        (["--ranks", "4", "--slots", "8", "--groups", "3"], "equal groups"),
    ],
)
def test_plan_errors_exit_2_with_one_line(
    load_file: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--load", str(load_file), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plan_rejects_unknown_file_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "load.txt"
    path.write_text("1,2\n")
    assert main(["plan", "--load", str(path), "--ranks", "1", "--slots", "2"]) == 2
    assert "unsupported file type" in capsys.readouterr().err


def test_plot_needs_matplotlib_or_draws(
    tmp_path: Path, load_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "heat.png"
    status = main(
        ["plan", "--load", str(load_file), "--ranks", "4", "--slots", "10", "--plot", str(image)]
    )
    if importlib.util.find_spec("matplotlib") is None:
        assert status == 2 and "pip install 'elastic_ep[plot]'" in capsys.readouterr().err
    else:
        assert status == 0 and image.stat().st_size > 0


def test_module_entry_point(load_file: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic_ep",
            "plan",
            "--load",
            str(load_file),
            "--ranks",
            "4",
            "--slots",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "balancedness" in result.stdout


def _plan(*args: str) -> list[str]:
    return ["plan", "--ranks", "4", "--slots", "10", *args]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == "", "nothing is printed before an error"
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("option", ["--load", "--previous"])
def test_a_pt_that_is_not_a_torch_file(
    tmp_path: Path, load_file: Path, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("these are notes, not a tensor\n")
    args = (
        ["--load", str(bad)] if option == "--load" else ["--load", str(load_file), option, str(bad)]
    )
    assert main(_plan(*args)) == 2
    err = _one_line_error(capsys)
    assert f"{bad}: not a torch tensor file" in err


def test_out_into_a_missing_folder_fails_before_planning(
    tmp_path: Path, load_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing" / "dir" / "p.pt"
    assert main(_plan("--load", str(load_file), "--out", str(out))) == 2
    err = _one_line_error(capsys)
    assert f"--out {out}: the folder {out.parent} does not exist" in err
    assert main(_plan("--load", str(load_file), "--out", str(tmp_path))) == 2
    assert "is a folder" in _one_line_error(capsys)


def test_a_text_file_named_npy_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "load.npy"
    bad.write_text("1,2,3\n4,5,6\n")
    assert main(_plan("--load", str(bad))) == 2
    assert f"{bad}: not a numpy .npy array file" in _one_line_error(capsys)


def test_a_placement_file_as_load_is_refused(
    tmp_path: Path, load_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    placement = tmp_path / "placement.pt"
    assert main(_plan("--load", str(load_file), "--out", str(placement))) == 0
    capsys.readouterr()
    assert main(_plan("--load", str(placement))) == 2
    err = _one_line_error(capsys)
    assert f"{placement} is a placement file" in err and "--previous" in err
    # and a load file as --previous is refused the other way round
    load_pt = tmp_path / "load.pt"
    torch.save({"load": torch.from_numpy(np.load(load_file))}, load_pt)
    assert main(_plan("--load", str(load_file), "--previous", str(load_pt))) == 2
    assert "needs a 'phy2log' key" in _one_line_error(capsys)


def test_a_bad_load_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "negative.csv"
    bad.write_text("1,-2\n3,4\n")
    assert main(["plan", "--load", str(bad), "--ranks", "1", "--slots", "2"]) == 2
    assert f"{bad}: load[0, 1] = -2.0 is negative" in _one_line_error(capsys)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3\n")
    assert main(["plan", "--load", str(ragged), "--ranks", "1", "--slots", "2"]) == 2
    assert f"{ragged}: not a comma-separated matrix" in _one_line_error(capsys)
