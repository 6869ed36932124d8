"""RayLauncher: start rank processes as Ray actors (the ``elastic_ep[ray]`` extra).

Multi-node MoE serving already runs on Ray; this launcher lets the coordinator place joiners
wherever Ray has resources (e.g. ``num_gpus=1`` per rank). Each rank is one actor whose single
method runs ``entry(spec)`` to completion; the actor's ObjectRef tells whether it ended. Ray is
imported lazily, so the rest of elastic_ep works without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from elastic_ep.scaling.launcher import RankSpec


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("RayLauncher needs Ray: pip install 'elastic_ep[ray]'") from err
    return ray


class _RankActor:
    """Runs one rank (wrapped with ``ray.remote`` at launch time)."""

    def run(self, entry: Callable[[RankSpec], Any], spec: RankSpec) -> None:
        import os

        import torch

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        entry(spec)


@dataclass
class RayRank:
    """A rank running in a Ray actor (:class:`~elastic_ep.scaling.launcher.RankHandle`)."""

    member_id: int
    actor: Any = field(repr=False)
    done: Any = field(repr=False)  # ObjectRef of the actor's run()

    def is_alive(self) -> bool:
        ready, _ = _ray().wait([self.done], timeout=0)
        return not ready

    def kill(self) -> None:
        _ray().kill(self.actor, no_restart=True)

    def join(self, timeout_s: float) -> bool:
        ready, _ = _ray().wait([self.done], timeout=timeout_s)
        return bool(ready)

    def result(self, timeout_s: float) -> None:
        """Re-raise the rank's exception, if it ended with one."""
        _ray().get(self.done, timeout=timeout_s)


class RayLauncher:
    """Start each rank as a Ray actor running ``entry(spec)``.

    Args:
        entry: the rank's main function (importable on the workers).
        num_cpus / num_gpus: resources each rank actor asks Ray for.
        options: extra ``actor.options(...)`` (e.g. a scheduling strategy, ``runtime_env``).
        init: ``ray.init`` keyword arguments, used only if Ray is not initialised yet.
    """

    def __init__(
        self,
        entry: Callable[[RankSpec], Any],
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        options: Mapping[str, Any] | None = None,
        init: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(entry):
            raise TypeError("entry must be callable")
        ray = _ray()
        if not ray.is_initialized():
            ray.init(**dict(init or {}))
        self._entry = entry
        self._actor_cls = ray.remote(_RankActor).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, **dict(options or {})
        )

    def launch(self, spec: RankSpec) -> RayRank:
        actor = self._actor_cls.remote()
        return RayRank(spec.member_id, actor, actor.run.remote(self._entry, spec))
