"""Give every launched rank its device: ``cpu``, or a GPU no live rank process holds."""

from __future__ import annotations

import dataclasses

from elastic_ep.demo.config import DemoConfig
from elastic_ep.demo.rank import RankConfig, rank_main
from elastic_ep.scaling import LocalProcessLauncher, RankHandle, RankSpec


class DeviceLauncher:
    """A :class:`~elastic_ep.scaling.Launcher` of demo ranks, one process per device.

    On ``nccl`` each launch takes the lowest-numbered GPU whose previous holder has exited (a
    leaver, a killed rank); on ``gloo`` every rank runs on the CPU.

    Raises:
        RuntimeError: no GPU is free (the config keeps the script within ``devices``, so a rank
            process outlived its event).
    """

    def __init__(self, config: DemoConfig) -> None:
        self._config = config
        self._launcher = LocalProcessLauncher(rank_main)
        self._holders: dict[int, RankHandle] = {}

    def _free_gpu(self) -> int:
        assert self._config.devices is not None
        for index in range(self._config.devices):
            holder = self._holders.get(index)
            if holder is None or not holder.is_alive():
                return index
        raise RuntimeError(f"all {self._config.devices} GPUs are held by live rank processes")

    def launch(self, spec: RankSpec) -> RankHandle:
        if self._config.backend == "nccl":
            index = self._free_gpu()
            device = f"cuda:{index}"
        else:
            index, device = -1, "cpu"
        handle = self._launcher.launch(
            dataclasses.replace(spec, config=RankConfig(self._config, device))
        )
        if index >= 0:
            self._holders[index] = handle
        return handle
