"""RayLauncher against a local Ray instance: a 2 -> 3 -> 2 scale with bit-exact weights."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from elastic_ep.scaling import ElasticCoordinator, ScaleLimits, ScalePhase, ScaleRequest  # noqa: E402
from elastic_ep.scaling.ray_launcher import RayLauncher  # noqa: E402
from tests.test_scaling_e2e import EngineConfig, _infos, rank_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_scale_with_ray_actors() -> None:
    launcher = RayLauncher(
        rank_main,
        num_cpus=0.5,
        init={
            "num_cpus": 4,
            "include_dashboard": False,
            "log_to_driver": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}},
        },
    )
    cfg = EngineConfig(layers=2, experts=4, slots=4)
    coord = ElasticCoordinator(launcher, ScaleLimits(4, 4, 16), config=cfg, timeout_s=10.0)
    try:
        status = coord.start(2, timeout_s=120)
        _infos(coord, status)
        status = coord.scale(ScaleRequest(world_size=3, timeout_s=60))
        assert status.phase is ScalePhase.COMPLETED, status
        _infos(coord, status)
        leaver = coord.handle(2)
        status = coord.scale(ScaleRequest(world_size=2, timeout_s=60))
        assert status.phase is ScalePhase.COMPLETED, status
        _infos(coord, status)
        assert leaver.join(10)
        leaver.result(10)  # type: ignore[attr-defined]  # the leaver returned cleanly
    finally:
        coord.shutdown()
        ray.shutdown()
