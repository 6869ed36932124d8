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

import numpy as np
import torch

from elastic_ep.eplb.placement import Placement
from elastic_ep.eplb.planner import plan
from elastic_ep.rank_mapping import RankMapping

POLICY_NAME = "default"
"""The only policy name vLLM's config accepts, hence the key :func:`register` replaces."""


class PolicyArgumentError(ValueError, AssertionError):
    """A bad argument to the policy. A ``ValueError`` like every bad argument in elastic_ep, and an
    ``AssertionError`` as vLLM's default policy raises for the same inputs, so callers written
    for either catch it."""


class ElasticEplbPolicy:
    """vLLM ``AbstractEplbPolicy`` interface: ``rebalance_experts`` and
    ``preserve_intragpu_slots`` as classmethods."""

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
            raise PolicyArgumentError(
                f"num_replicas={num_replicas} is not a multiple of num_ranks={num_ranks}"
            )
        slots = num_replicas // num_ranks
        hierarchical = num_nodes > 1 and num_groups % num_nodes == 0
        previous, mapping = None, None
        if old_global_expert_indices is not None:
            old = old_global_expert_indices.detach().to("cpu", torch.int64)
            if old.dim() != 2 or old.shape[1] % slots:
                raise PolicyArgumentError(
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
            shares=False,  # vLLM builds its routing tables from phy2log: an even split
        )
        if previous is None or previous.num_ranks != num_ranks:
            return placement.phy2log
        # Experts a rank keeps stay in their slots, as vLLM's default policy leaves them.
        kept = cls.preserve_intragpu_slots(
            placement.phy2log.numpy(), num_ranks, previous.phy2log.numpy()
        )
        return torch.from_numpy(kept)

    @classmethod
    def preserve_intragpu_slots(
        cls, phy2log: np.ndarray, num_ranks: int, old_phy2log: np.ndarray
    ) -> np.ndarray:
        """Reorder each rank's slots so that an expert it keeps stays in its old slot.

        vLLM's default policy applies this to its own result when the ranks and slots per rank
        are unchanged, and so does :meth:`rebalance_experts` here. Per rank and layer, the multiset of experts is that of
        ``phy2log``; an expert the rank held before takes its first old slot (once per old
        occurrence), and the other experts fill the remaining slots in their order in
        ``phy2log``.

        Args:
            phy2log: int [L, P], the new map (-1 = empty), P a multiple of ``num_ranks``.
            num_ranks: R, EP ranks.
            old_phy2log: int [L, P], the current map.

        Returns:
            int [L, P], ``phy2log`` with each rank's slots reordered (a new array).
        """
        new = np.asarray(phy2log)
        old = np.asarray(old_phy2log)
        if new.ndim != 2 or old.shape != new.shape:
            raise PolicyArgumentError(
                f"phy2log {new.shape} and old_phy2log {old.shape} must be equal [layers, slots]"
            )
        if num_ranks < 1 or new.shape[1] % num_ranks:
            raise PolicyArgumentError(
                f"{new.shape[1]} slots are not a multiple of num_ranks={num_ranks}"
            )
        slots = new.shape[1] // num_ranks
        # One row per (layer, rank): its slots' experts.
        new_rows = new.reshape(-1, slots)
        old_rows = old.reshape(-1, slots)
        result = np.empty_like(new_rows)
        taken = np.zeros(new_rows.shape, dtype=bool)  # new entries already placed
        kept = np.zeros(new_rows.shape, dtype=bool)  # old slots that keep their expert
        rows = np.arange(new_rows.shape[0])
        for slot in range(slots):
            match = (new_rows == old_rows[:, slot : slot + 1]) & ~taken
            has = match.any(axis=1)
            first = match.argmax(axis=1)
            result[has, slot] = new_rows[rows[has], first[has]]
            taken[rows[has], first[has]] = True
            kept[has, slot] = True
        # The rest, in phy2log's order, into the free slots in slot order: a stable sort puts
        # each row's untaken entries (and free slots) first, in their original order.
        sources = np.argsort(taken, axis=1, kind="stable")
        targets = np.argsort(kept, axis=1, kind="stable")
        free = (~kept).sum(axis=1)
        for count in np.unique(free):
            if count == 0:
                continue
            sel = rows[free == count]
            src = sources[sel, :count]
            dst = targets[sel, :count]
            result[sel[:, None], dst] = new_rows[sel[:, None], src]
        return result.reshape(new.shape)


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
