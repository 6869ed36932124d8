"""Epoch-bound resources: things tied to one epoch's groups, rebuilt at every commit.

All-to-all handles, CUDA graphs, communicators of a third-party kernel, user objects: each is
registered once by name with a ``build`` hook (and an optional ``teardown``) and the names it
depends on. At a commit the agent builds a complete new :class:`ResourceSet` against the next
epoch's groups *before* switching, in dependency order; only when every resource built does it
install the new set and tear the old one down in reverse order. A build failure tears down what
was built and leaves the serving set untouched, so the scale can roll back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from elastic_ep.eplb.placement import Placement
from elastic_ep.errors import ElasticEPError


class ResourceError(ElasticEPError):
    """Building or tearing down an epoch-bound resource failed.

    Attributes:
        resource: the name of the resource whose hook raised.
    """

    def __init__(self, message: str, *, resource: str):
        super().__init__(message)
        self.resource = resource


@dataclass(frozen=True)
class EpochContext:
    """What a ``build`` hook gets.

    Attributes:
        epoch: the epoch the resource belongs to.
        rank: this process's rank in that epoch.
        world_size: ranks in that epoch.
        groups: the epoch's process groups (an ``ElasticWorld``'s groups or a ``StatelessGroup``;
            whatever the agent was built with).
        placement: the epoch's expert placement, if the engine has one.
        rendezvous: the job's ``Rendezvous``, to build extra groups for ``epoch`` (e.g. EP
            sub-groups named ``"ep0"``).
        deps: the already-built resources this one declared in ``depends_on``, by name.
    """

    epoch: int
    rank: int
    world_size: int
    groups: Any
    placement: Placement | None = None
    rendezvous: Any = None
    deps: Mapping[str, Any] = field(default_factory=dict)


BuildHook = Callable[[EpochContext], Any]
TeardownHook = Callable[[Any], None]


@dataclass(frozen=True)
class _Spec:
    name: str
    build: BuildHook
    teardown: TeardownHook | None
    depends_on: tuple[str, ...]


class ResourceSet:
    """The built resources of one epoch (read with ``set[name]``)."""

    def __init__(self, epoch: int, specs: tuple[_Spec, ...], values: dict[str, Any]) -> None:
        self.epoch = epoch
        self._specs = specs
        self._values = values

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"no resource named {name!r} in epoch {self.epoch}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._specs if s.name in self._values)

    def teardown(self) -> None:
        """Tear every resource down in reverse dependency order (each hook runs once).

        Every hook runs even if an earlier one raised; the first error is then raised.
        """
        first: ResourceError | None = None
        for spec in reversed(self._specs):
            if spec.name not in self._values:
                continue
            value = self._values.pop(spec.name)
            if spec.teardown is None:
                continue
            try:
                spec.teardown(value)
            except Exception as exc:
                first = first or ResourceError(
                    f"teardown of resource {spec.name!r} (epoch {self.epoch}) failed: {exc!r}",
                    resource=spec.name,
                )
        if first is not None:
            raise first


class EpochResources:
    """Registry of epoch-bound resources; :meth:`build` makes a set, :meth:`install` swaps it in.

    A resource may only depend on resources registered before it, so registration order is a
    dependency order and cycles cannot be expressed.
    """

    def __init__(self) -> None:
        self._specs: list[_Spec] = []
        self._lock = threading.Lock()
        self._current: ResourceSet | None = None

    def register(
        self,
        name: str,
        build: BuildHook,
        *,
        teardown: TeardownHook | None = None,
        depends_on: tuple[str, ...] | list[str] = (),
    ) -> None:
        """Add a resource. Raises ``ValueError`` for a duplicate name or an unknown dependency."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if not callable(build):
            raise TypeError(f"build hook of {name!r} must be callable")
        if teardown is not None and not callable(teardown):
            raise TypeError(f"teardown hook of {name!r} must be callable or None")
        deps = tuple(depends_on)
        with self._lock:
            known = {s.name for s in self._specs}
            if name in known:
                raise ValueError(f"resource {name!r} is already registered")
            unknown = [d for d in deps if d not in known]
            if unknown:
                raise ValueError(
                    f"resource {name!r} depends on unregistered {unknown} (register those first)"
                )
            self._specs.append(_Spec(name, build, teardown, deps))

    @property
    def order(self) -> tuple[str, ...]:
        """Names in build order (teardown runs in reverse)."""
        with self._lock:
            return tuple(s.name for s in self._specs)

    @property
    def current(self) -> ResourceSet | None:
        """The installed set (the serving epoch's), ``None`` before the first install."""
        return self._current

    def get(self, name: str) -> Any:
        """The serving epoch's resource ``name``."""
        if self._current is None:
            raise KeyError(f"no resources installed yet (asked for {name!r})")
        return self._current[name]

    def build(self, ctx: EpochContext) -> ResourceSet:
        """Build every resource for ``ctx`` in dependency order, without installing the set.

        On a failing hook, tears down what was built and raises ``ResourceError``.
        """
        with self._lock:
            specs = tuple(self._specs)
        values: dict[str, Any] = {}
        built = ResourceSet(ctx.epoch, specs, values)
        for spec in specs:
            deps = {d: values[d] for d in spec.depends_on}
            try:
                values[spec.name] = spec.build(dataclasses.replace(ctx, deps=deps))
            except Exception as exc:
                with contextlib.suppress(ResourceError):  # the build error is the one to report
                    built.teardown()
                raise ResourceError(
                    f"building resource {spec.name!r} for epoch {ctx.epoch} failed: {exc!r}",
                    resource=spec.name,
                ) from exc
        return built

    def install(self, new: ResourceSet) -> ResourceSet | None:
        """Make ``new`` the serving set; return the previous one (the caller tears it down)."""
        previous, self._current = self._current, new
        return previous
