"""vLLM EPLB policy backed by the elastic_ep planner.

vLLM (0.33) picks its EPLB policy from the dict ``vllm.distributed.eplb.policy.EPLB_POLICIES``
when an engine starts, and its config accepts only the name ``"default"``. :func:`register`
replaces that entry with :class:`ElasticEplbPolicy`; run it from a ``vllm.general_plugins``
entry point, which vLLM loads in every process before the model::

    [project.entry-points."vllm.general_plugins"]
    elastic_ep_eplb = "elastic_ep.adapters.vllm:register"

Nothing here imports vLLM until :func:`register` or :func:`vllm_policy_class` is called.
"""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from elastic_ep.eplb.placement import Placement
from elastic_ep.eplb.planner import plan
from elastic_ep.rank_mapping import RankMapping

POLICY_NAME = "default"
"""The only policy name vLLM's config accepts, hence the key :func:`register` replaces."""


class ElasticEplbPolicy:
    """vLLM ``AbstractEplbPolicy`` interface: ``rebalance_experts`` as a classmethod."""

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New physical-to-logical map, movement-aware when the old one is given.

        Args:
            weight: [L, E] load per logical expert (any real dtype).
            num_replicas: P, physical experts per layer, a multiple of ``num_ranks``.
            num_groups: expert groups; hierarchical when a multiple of ``num_nodes`` > 1.
            num_nodes: server nodes.
            num_ranks: R, EP ranks.
            old_global_expert_indices: int64 [L, P_old], the current map (-1 = empty). With
                ``P_old != P`` it is a scale event with slots per rank constant: old ranks
                beyond R are removed, new ranks appended.

        Returns:
            int64 [L, P]: logical expert of every physical slot (-1 = empty).
        """
        if num_ranks < 1 or num_replicas % num_ranks:
            raise ValueError(
                f"num_replicas={num_replicas} is not a multiple of num_ranks={num_ranks}"
            )
        slots = num_replicas // num_ranks
        hierarchical = num_nodes > 1 and num_groups % num_nodes == 0
        previous, mapping = None, None
        if old_global_expert_indices is not None:
            old = old_global_expert_indices.detach().to("cpu", torch.int64)
            if old.dim() != 2 or old.shape[1] % slots:
                raise ValueError(
                    f"old_global_expert_indices must be [layers, old_ranks * {slots}], "
                    f"got {tuple(old.shape)}"
                )
            previous = Placement(old, int(weight.shape[-1]), old.shape[1] // slots)
            mapping = RankMapping.resize(previous.num_ranks, num_ranks)
        placement = plan(
            weight,
            num_ranks,
            slots,
            num_groups=num_groups if hierarchical else 1,
            num_nodes=num_nodes if hierarchical else 1,
            previous=previous,
            rank_mapping=mapping,
        )
        return placement.phy2log


def vllm_policy_class(abstract: type | None = None) -> type:
    """:class:`ElasticEplbPolicy` as a subclass of vLLM's ``AbstractEplbPolicy``.

    Args:
        abstract: the abstract class to derive from; imported from vLLM when ``None``.
    """
    if abstract is None:
        from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy

        abstract = AbstractEplbPolicy
    return type("ElasticEplbPolicy", (ElasticEplbPolicy, abstract), {"__module__": __name__})


def register(registry: dict[str, Any] | None = None) -> None:
    """Make vLLM's ``"default"`` EPLB policy ours (the ``vllm.general_plugins`` entry point).

    Args:
        registry: the policy dict to update; vLLM's ``EPLB_POLICIES`` when ``None``.
    """
    if registry is None:
        from vllm.distributed.eplb.policy import EPLB_POLICIES

        registry = EPLB_POLICIES
    base = None
    for policy in registry.values():
        base = next((c for c in policy.__mro__ if c.__name__ == "AbstractEplbPolicy"), None)
        if base is not None:
            break
    registry[POLICY_NAME] = vllm_policy_class(base)


def load_policy_modules(
    wheel: Path | None = None,
) -> tuple[types.ModuleType, types.ModuleType, str]:
    """vLLM's ``policy.abstract`` and ``policy.default`` modules and vLLM's version.

    From the installed vllm when ``wheel`` is ``None``; otherwise read from the wheel file
    without installing it (the two modules need only numpy and torch). For benchmarks and tests.
    """
    if wheel is None:
        import vllm
        from vllm.distributed.eplb.policy import abstract, default

        return abstract, default, str(vllm.__version__)
    package = "_elastic_ep_vllm_policy"
    with zipfile.ZipFile(wheel) as archive:
        suffix = ".dist-info/METADATA"
        version = next(
            n[: -len(suffix)].split("-")[1] for n in archive.namelist() if n.endswith(suffix)
        )
        sources = {
            name: archive.read(f"vllm/distributed/eplb/policy/{name}.py").decode()
            for name in ("abstract", "default")
        }
    parent = types.ModuleType(package)
    parent.__path__ = []
    sys.modules[package] = parent
    modules = []
    for name, source in sources.items():
        module = types.ModuleType(f"{package}.{name}")
        module.__package__ = package
        sys.modules[module.__name__] = module
        exec(
            compile(source, f"{wheel}!vllm/distributed/eplb/policy/{name}.py", "exec"),
            module.__dict__,
        )
        modules.append(module)
    return modules[0], modules[1], version
