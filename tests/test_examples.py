"""The examples in examples/, run as a user runs them: a fresh process, from another directory.

Each example checks its own results and exits non-zero when one is wrong (custom_engine: every
rank's forward against the single-process reference after each event, every event completed;
planner_only: every routed token lands on a slot of its expert, the planned placement spreads
the load better). The vLLM plugin is installed with pip into a throwaway directory and its entry
point is found and called as vLLM does, with a stand-in for vLLM's policy registry (and with
vLLM's own classes when its wheel is at hand).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PLUGIN = EXAMPLES / "vllm_plugin"


def run_python(args: list[str], cwd: Path, timeout_s: float, path: list[Path] = ()) -> str:
    """Run ``python *args`` in ``cwd`` with the repo (and ``path``) importable; its stdout.

    Fails with the process's output when it exits non-zero."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (*path, REPO)))
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_custom_engine_scales_rebalances_and_survives_a_killed_rank(tmp_path: Path) -> None:
    out = run_python([str(EXAMPLES / "custom_engine.py")], tmp_path, timeout_s=120)
    lines = out.strip().splitlines()
    assert lines[-1] == (
        "custom_engine: OK (2 ranks serving after 2 -> 4 -> 3 -> rebalance -> kill)"
    ), out
    assert [line.split("{")[0].strip() for line in lines if "{" in line] == [
        "started",
        "scaled up over HTTP",
        "scaled down",
        "rebalanced",
        "rank killed, recovered",
    ], out
    assert "GET /status: 4 ranks" in lines, out


@pytest.mark.timeout(90)
def test_planner_only_routes_through_the_planned_tables(tmp_path: Path) -> None:
    out = run_python([str(EXAMPLES / "planner_only.py")], tmp_path, timeout_s=60)
    lines = out.strip().splitlines()
    assert lines[-1] == "planner_only: OK (4 layers x 32 experts, 8 -> 10 ranks x 5 slots)", out
    assert lines[0].startswith("8 ranks: busiest rank / mean"), out
    assert list(tmp_path.iterdir()) == []  # the load file lived in a temporary directory


# Run in a fresh process with the installed (or source) plugin on the path: find the entry point
# the way vLLM's plugin loader does, load it, and call it on a registry shaped like vLLM's.
_CALL_ENTRY_POINT = textwrap.dedent(
    """
    import abc, os, sys
    from importlib.metadata import entry_points

    from elastic_ep.adapters.vllm import ElasticEplbPolicy, load_policy_modules

    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == "elastic_ep_eplb"]
    register = plugin.load()

    class AbstractEplbPolicy(abc.ABC):  # the shape of vLLM's base class
        @classmethod
        @abc.abstractmethod
        def rebalance_experts(cls, *args): ...

    class DefaultEplbPolicy(AbstractEplbPolicy):
        @classmethod
        def rebalance_experts(cls, *args):
            raise AssertionError("vLLM's policy must not be used")

    bases = [(AbstractEplbPolicy, DefaultEplbPolicy)]
    if len(sys.argv) > 1:  # vLLM's own classes, read from its wheel
        abstract, default, _ = load_policy_modules(sys.argv[1])
        bases.append((abstract.AbstractEplbPolicy, default.DefaultEplbPolicy))
    for base, default_policy in bases:
        registry = {"default": default_policy}
        os.environ["ELASTIC_EP_EPLB"] = "0"
        register(registry)
        assert registry["default"] is default_policy  # switched off: vLLM's policy stays
        del os.environ["ELASTIC_EP_EPLB"]
        register(registry)
        policy = registry["default"]
        assert issubclass(policy, base) and issubclass(policy, ElasticEplbPolicy), policy.__mro__
        import torch
        phy2log = policy.rebalance_experts(torch.ones(2, 8), 8, 1, 1, 2)
        assert tuple(phy2log.shape) == (2, 8), phy2log
    print(f"registered through {plugin.value} for {len(bases)} registries")
    """
)


def _vllm_wheel() -> Path | None:
    named = os.environ.get("ELASTIC_EP_VLLM_WHEEL")
    if named:
        return Path(named)
    found = sorted((REPO / ".carry" / "wheels").glob("vllm-*.whl"))
    return found[-1] if found else None


def _call_entry_point(cwd: Path, path: list[Path]) -> str:
    script = cwd / "call_entry_point.py"
    script.write_text(_CALL_ENTRY_POINT)
    wheel = _vllm_wheel()
    args = [str(script)] + ([str(wheel)] if wheel is not None else [])
    return run_python(args, cwd, timeout_s=60, path=path).strip()


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="pip needs setuptools to build it"
)
def test_vllm_plugin_installs_and_its_entry_point_registers_the_policy(tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(PLUGIN, source)  # the build writes next to its sources: keep the repo clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
         "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        timeout=100,
    )  # fmt: skip
    assert (target / "elastic_ep_vllm_plugin" / "__init__.py").is_file()
    out = _call_entry_point(tmp_path, [target])
    assert out.startswith("registered through elastic_ep_vllm_plugin:register"), out


def test_vllm_plugin_metadata_names_its_register_function(tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((PLUGIN / "pyproject.toml").read_text())
    points = meta["project"]["entry-points"]["vllm.general_plugins"]
    assert points == {"elastic_ep_eplb": "elastic_ep_vllm_plugin:register"}
    assert meta["tool"]["setuptools"]["packages"] == ["elastic_ep_vllm_plugin"]
    # the entry point as pip would describe it, the package from the source tree
    site = tmp_path / "site"
    info = site / "elastic_ep_vllm_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: elastic-ep-vllm-plugin\n")
    lines = [f"{name} = {value}" for name, value in points.items()]
    (info / "entry_points.txt").write_text("\n".join(["[vllm.general_plugins]", *lines, ""]))
    out = _call_entry_point(tmp_path, [site, PLUGIN])
    assert out.startswith("registered through elastic_ep_vllm_plugin:register"), out
