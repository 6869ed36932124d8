"""StatelessGroup: a process group that can be built, rebuilt and aborted inside a live process.

torch's own groups live in a process-wide registry tied to one default group, so a process cannot
leave a broken group behind and build a new one. A StatelessGroup is built directly on a key
prefix of the job's long-lived TCPStore (see :mod:`elastic_ep.groups.rendezvous`) for one
``(name, epoch)``, so any number of them can exist side by side (e.g. the current epoch's groups
serving while the next epoch's are built as standby).

Building meets at an arrival gate in the store before the backend connects
(:mod:`elastic_ep.groups.arrival_gate`): either every rank passes it or none does. gloo then
reads its peers' addresses through a :class:`~elastic_ep.groups.mesh_store.MeshStore` (one bulk
read per rank). Pending work is in :mod:`elastic_ep.groups.work`.

Failure model: every operation either completes, or raises :class:`~elastic_ep.errors.PeerFailure`
within the group's ``timeout_s`` (gloo's per-operation timeout; NCCL synchronising calls wait with
it). After a PeerFailure the group is *broken*: later operations raise PeerFailure at once, and
the caller should :meth:`~StatelessGroup.abort` it and build a new epoch. A member that is killed
is seen by its neighbours at once ("connection reset"), by the others at the timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal, overload

import torch
from torch.distributed import ProcessGroup, ReduceOp, Store, Work

from elastic_ep.errors import ElasticEPError, PeerFailure
from elastic_ep.groups.arg_checks import (
    check_int,
    check_peer,
    check_splits,
    check_tensor,
    parse_device,
    split_p2p,
)
from elastic_ep.groups.arrival_gate import first_missing, pass_arrival_gate
from elastic_ep.groups.backend import Backend, default_device, make_process_group
from elastic_ep.groups.mesh_store import MeshStore
from elastic_ep.groups.objects import all_gather_object, broadcast_object
from elastic_ep.groups.polling import wait_until
from elastic_ep.groups.rendezvous import Rendezvous, check_timeout, prefix_of
from elastic_ep.groups.work import P2PBatch, WorkHandle, post_p2p


class GroupClosedError(ElasticEPError):
    """An operation was called on a group after :meth:`StatelessGroup.destroy` or ``abort``."""


class StatelessGroup:
    """A process group of ``world_size`` ranks for one ``(name, epoch)``, outside torch's registry.

    Building is collective: every rank constructs a StatelessGroup with the same ``name``,
    ``epoch``, ``world_size`` and backend, and its own ``rank``. The constructor returns once all
    ranks have arrived (gloo: full mesh connected; NCCL: communicator created and a first
    collective), or raises PeerFailure naming the first missing rank after ``build_timeout_s``.

    Args:
        rendezvous: the job's Rendezvous; the group keys live under ``group/<name>/epoch/<epoch>``.
        name: group name (non-empty, no ``/``), e.g. ``"world"`` or ``"ep0"``.
        epoch: epoch number (>= 0). A ``(name, epoch)`` can be built only once per job: building
            it again raises ValueError, since stale keys would be read.
        rank: this process's rank in the group, ``0 <= rank < world_size``.
        world_size: number of ranks (>= 1).
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
        device: device of the tensors passed to this group; default CPU for gloo, the current
            CUDA device for NCCL.
        timeout_s: bound on every operation (> 0), and on the build unless ``build_timeout_s``
            is given.
        build_timeout_s: bound on waiting for every rank to arrive at the build (> 0). After a
            failure, survivors notice it up to ``timeout_s`` apart, so a rebuild right after one
            needs a longer build timeout than the operation timeout.
        connect: NCCL only: run a first collective (a barrier) in the constructor, so peers
            are connected and "built" means built. ``False``: the constructor creates the
            communicator (collectively, with no GPU work) and the group's first operation
            connects the peers. Build with ``False`` on a background thread while another
            thread of the process runs NCCL collectives on the same GPU: NCCL only makes
            progress when every rank launches on its communicators in one order, and a
            background thread's launches would interleave with the other thread's differently
            on each rank. Every rank of a group must pass the same value.

    Attributes (read-only): name, epoch, rank, world_size, backend, device, timeout_s,
    process_group (a real ``torch.distributed.ProcessGroup``:
    ``torch.distributed.all_reduce(t, group=g.process_group)`` works).
    """

    def __init__(
        self,
        rendezvous: Rendezvous,
        name: str,
        epoch: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        device: torch.device | str | None = None,
        timeout_s: float = 30.0,
        *,
        build_timeout_s: float | None = None,
        connect: bool = True,
    ) -> None:
        if not isinstance(rendezvous, Rendezvous):
            raise TypeError(f"rendezvous must be a Rendezvous, got {type(rendezvous).__name__}")
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        check_int("epoch", epoch, minimum=0)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        prefix = prefix_of("group", name, "epoch", epoch)
        parsed = Backend.parse(backend)
        check_timeout(timeout_s)
        build_timeout_s = timeout_s if build_timeout_s is None else build_timeout_s
        check_timeout(build_timeout_s, "build_timeout_s")
        dev = default_device(parsed) if device is None else parse_device(device)
        if dev.type != parsed.device_type:
            raise ValueError(
                f"device {dev} does not fit backend {parsed.value!r} ({parsed.device_type} tensors)"
            )

        self._name = name
        self._epoch = epoch
        self._rank = rank
        self._world_size = world_size
        self._backend = parsed
        self._device = dev
        self._timeout_s = float(timeout_s)
        self._build_timeout_s = float(build_timeout_s)
        self._failure: PeerFailure | None = None
        self._closed = False
        self._rendezvous = rendezvous
        self._client: Store | None = rendezvous.client(build_timeout_s)
        store: Store = torch.distributed.PrefixStore(prefix, self._client)
        self._pg: ProcessGroup | None = None
        self._mesh: MeshStore | None = None
        try:
            self._rendezvous_all(store)
            # gloo reads its peers' addresses through a MeshStore: O(1) store calls per rank
            # (kept: the process group may call it again and it lives on the Python side)
            self._mesh = (
                MeshStore(store, world_size, build_timeout_s) if parsed is Backend.GLOO else None
            )
            self._pg = make_process_group(
                self._mesh or store,
                rank,
                world_size,
                parsed,
                dev,
                timeout_s,
                build_timeout_s,
                f"{name}@{epoch}",
            )
            if parsed is Backend.NCCL and connect:
                # NCCL connects peers at the first collective: it makes "built" mean built.
                self.barrier()
        except PeerFailure:
            self._release()
            raise
        except RuntimeError as err:
            self._release()
            raise self._peer_failure(
                "build", err, peer=first_missing(store, world_size), timeout_s=build_timeout_s
            ) from err
        except BaseException:
            self._release()
            raise

    # ---- read-only attributes -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def backend(self) -> str:
        return self._backend.value

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def process_group(self) -> ProcessGroup:
        return self._usable("process_group")

    @property
    def failure(self) -> PeerFailure | None:
        """The PeerFailure that broke this group, or None while it is healthy."""
        return self._failure

    @property
    def closed(self) -> bool:
        """True after destroy() or abort()."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._failure else "ok"
        return (
            f"StatelessGroup(name={self._name!r}, epoch={self._epoch}, rank={self._rank}, "
            f"world_size={self._world_size}, backend={self.backend!r}, {state})"
        )

    # ---- collectives --------------------------------------------------------------------
    @overload
    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp.RedOpType = ...,
        *,
        sync: bool = ...,
        async_op: Literal[False] = ...,
    ) -> torch.Tensor: ...

    @overload
    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp.RedOpType = ...,
        *,
        sync: bool = ...,
        async_op: Literal[True],
    ) -> WorkHandle: ...

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp.RedOpType = ReduceOp.SUM,
        *,
        sync: bool = False,
        async_op: bool = False,
    ) -> torch.Tensor | WorkHandle:
        """Reduce ``tensor`` (any shape/dtype, on ``device``) over all ranks, in place; returns it.

        On NCCL the reduction is stream-ordered; ``sync=True`` also waits for it on the CPU
        within ``timeout_s`` (PeerFailure past it). Pass it when the host reads the result: a
        plain read (``.item()``) of a reduction that a dead peer never completes has no bound
        of its own, and what it reads once torch's watchdog has aborted the communicator is
        not the reduction.

        ``async_op=True`` returns a :class:`WorkHandle` at once instead (``sync`` must be
        False): ``wait()`` on it before using ``tensor``; a host that reads ``tensor`` after an
        event on the stream calls ``raise_if_failed()`` too.
        """
        check_tensor("tensor", tensor, self._device, self._name)
        if async_op and sync:
            raise ValueError("all_reduce: sync=True waits here; it cannot go with async_op=True")
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = ReduceOp(op)
        if async_op:
            return WorkHandle(
                self,
                "all_reduce",
                [self._start("all_reduce", lambda pg: pg.allreduce([tensor], opts))],
                [],
            )
        self._run("all_reduce", lambda pg: pg.allreduce([tensor], opts), sync=sync)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Copy rank ``src``'s ``tensor`` into every rank's ``tensor`` (same shape/dtype); returns it."""
        check_tensor("tensor", tensor, self._device, self._name)
        check_peer("src", src, self._world_size)
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = src
        self._run("broadcast", lambda pg: pg.broadcast([tensor], opts))
        return tensor

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> torch.Tensor:
        """Exchange slices of dim 0: rank r's ``input`` rows for rank j land in rank j's ``output``.

        Args:
            output: ``[sum(output_split_sizes), *rest]`` tensor filled in place (same dtype and
                trailing shape as ``input``).
            input: ``[sum(input_split_sizes), *rest]`` tensor.
            output_split_sizes: rows received from each rank (``world_size`` ints), or None for
                equal splits of ``output.shape[0]``.
            input_split_sizes: rows sent to each rank, or None for equal splits.
        Returns:
            ``output``.
        """
        check_tensor("output", output, self._device, self._name)
        check_tensor("input", input, self._device, self._name)
        if output.dtype != input.dtype or output.shape[1:] != input.shape[1:]:
            raise ValueError(
                f"output ({output.dtype}, {tuple(output.shape)}) and input ({input.dtype}, "
                f"{tuple(input.shape)}) must share dtype and trailing shape"
            )
        out_splits = check_splits(
            "output_split_sizes", output_split_sizes, output, self._world_size
        )
        in_splits = check_splits("input_split_sizes", input_split_sizes, input, self._world_size)
        self._run(
            "all_to_all_single",
            lambda pg: pg.alltoall_base(
                output, input, out_splits, in_splits, torch.distributed.AllToAllOptions()
            ),
        )
        return output

    def barrier(self) -> None:
        """Return once every rank has called barrier (raises PeerFailure after ``timeout_s``)."""
        token = torch.ones(1, dtype=torch.int32, device=self._device)
        self._run("barrier", lambda pg: pg.allreduce([token]), sync=True)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order. Peers are trusted (pickle)."""
        return all_gather_object(self, obj)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (other ranks' ``obj`` is ignored)."""
        check_peer("src", src, self._world_size)
        return broadcast_object(self, obj, src)

    def broadcast_sync(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """:meth:`broadcast`, then wait for it on the CPU (bounded by ``timeout_s`` on NCCL too)."""
        check_tensor("tensor", tensor, self._device, self._name)
        check_peer("src", src, self._world_size)
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = src
        self._run("broadcast", lambda pg: pg.broadcast([tensor], opts), sync=True)
        return tensor

    def batch_p2p(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[torch.Tensor, int]],
        *,
        async_op: bool = False,
    ) -> WorkHandle | None:
        """Post a batch of point-to-point transfers; coalesced into one launch on NCCL.

        Args:
            sends: ``(tensor, dst_rank)`` pairs; each tensor is sent whole.
            recvs: ``(tensor, src_rank)`` pairs; each tensor is filled in place. Between one pair
                of ranks, the k-th send is received by the k-th recv (same shape and dtype).
                Transfers to/from this rank itself are done as local copies, in the same order.
            async_op: if True return a :class:`WorkHandle` to ``wait()`` on; otherwise wait here.
        Returns:
            the handle, or None when ``async_op`` is False.
        """
        handle = self.prepare_p2p(sends, recvs).post()
        if async_op:
            return handle
        handle.wait()
        return None

    def prepare_p2p(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
    ) -> P2PBatch:
        """Check a batch for :meth:`batch_p2p` now, post it later (``P2PBatch.post``): the
        checks cost a few microseconds per transfer, which a caller that posts a known batch
        at a critical moment pays ahead. Arguments as for :meth:`batch_p2p`."""
        self._usable("batch_p2p")
        remote_sends, remote_recvs, self_copies = split_p2p(
            sends, recvs, self._rank, self._world_size, self._device, self._name
        )
        return P2PBatch(self, remote_sends, remote_recvs, self_copies)

    def wait_for(self, done: Callable[[], bool], what: str, *, peer: int | None = None) -> None:
        """Wait on the CPU until ``done()`` (e.g. ``work.is_completed`` or a CUDA event's
        ``query`` after this group's work), polling without torch's 1 ms sleep (see
        :mod:`elastic_ep.groups.polling`). Past ``timeout_s`` the group is broken and its
        communicator aborted at once, as torch's own timed wait does: a kernel left waiting
        for a dead peer holds back every later launch on the streams that wait for it, a new
        group's first collective included.

        Raises:
            PeerFailure: ``done()`` stayed False for ``timeout_s`` (``what`` names the wait).
        """
        if wait_until(done, self._timeout_s):
            return
        failure = self._broken(what, TimeoutError("not completed"), peer=peer)
        if self._pg is not None:
            with contextlib.suppress(RuntimeError):
                self._pg.abort()
        raise failure

    # ---- teardown -----------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the group (connections, threads, store client). Idempotent.

        A broken group is aborted instead, since an orderly shutdown can wait on a dead peer.
        """
        if self._closed:
            return
        if self._failure is not None:
            self.abort()
            return
        self._closed = True
        pg = self._pg
        if pg is not None:
            try:
                pg.shutdown()
            except RuntimeError:
                pg.abort()
        # A cleanly closed group leaves its store connection in a known state: reuse it.
        if self._client is not None:
            self._rendezvous.recycle(self._client)
        self._release()

    def abort(self) -> None:
        """Tear the group down without waiting for peers (use when a peer may be dead).

        Never hangs; idempotent. In-flight operations of this group fail.
        """
        if self._closed:
            return
        self._closed = True
        pg = self._pg
        if pg is not None:
            # An abort that fails leaves nothing more to release than dropping the group.
            with contextlib.suppress(RuntimeError):
                pg.abort()
        self._release()

    # ---- internals ----------------------------------------------------------------------
    def _release(self) -> None:
        self._closed = True
        self._pg = None
        self._mesh = None
        self._client = None

    def _usable(self, op: str) -> ProcessGroup:
        if self._closed or self._pg is None:
            raise GroupClosedError(
                f"{op} on group {self._name!r} epoch {self._epoch}: the group is closed"
            )
        if self._failure is not None:
            raise PeerFailure(
                f"{op} on group {self._name!r} epoch {self._epoch}: the group is broken since an "
                f"earlier failure ({self._failure}); abort it and build a new epoch",
                group=self._name,
                epoch=self._epoch,
                member=self._failure.member,
            )
        return self._pg

    def _rendezvous_all(self, store: Store) -> None:
        """Pass the arrival gate (see :mod:`elastic_ep.groups.arrival_gate`) within
        ``build_timeout_s``, or raise PeerFailure naming the first missing rank."""
        error = pass_arrival_gate(
            store,
            self._rank,
            self._world_size,
            self._build_timeout_s,
            f"{self._name!r} epoch {self._epoch}",
        )
        if error is not None:
            raise self._peer_failure(
                "build",
                error,
                peer=first_missing(store, self._world_size),
                timeout_s=self._build_timeout_s,
            )

    def _broken(self, op: str, err: BaseException, *, peer: int | None) -> PeerFailure:
        """Mark the group broken by ``err``; return the PeerFailure to raise.

        The stored copy is never raised, so it holds no traceback: a traceback's frames would
        reference this group (and its ProcessGroup), keeping its threads and sockets alive in a
        reference cycle after abort.
        """
        self._failure = self._peer_failure(op, err, peer=peer)
        return self._peer_failure(op, err, peer=peer)

    def _peer_failure(
        self, op: str, err: BaseException, *, peer: int | None, timeout_s: float | None = None
    ) -> PeerFailure:
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        who = "" if peer is None else f" (rank {peer} missing or failed)"
        return PeerFailure(
            f"{op} on group {self._name!r} epoch {self._epoch} rank {self._rank}/{self._world_size} "
            f"failed within {timeout_s:g} s{who}: {err}",
            group=self._name,
            epoch=self._epoch,
            member=peer,
        )

    def _start(
        self, op: str, start: Callable[[ProcessGroup], Work], *, peer: int | None = None
    ) -> Work:
        pg = self._usable(op)
        try:
            return start(pg)
        except RuntimeError as err:
            raise self._broken(op, err, peer=peer) from err

    def _run(
        self,
        op: str,
        start: Callable[[ProcessGroup], Work],
        *,
        peer: int | None = None,
        sync: bool = False,
    ) -> None:
        self._wait(self._start(op, start, peer=peer), op, peer=peer, sync=sync)

    def _wait(self, work: Work, op: str, *, peer: int | None, sync: bool) -> None:
        # gloo completes (or times out) on the CPU. NCCL work is stream-ordered: plain wait() only
        # orders the current stream; sync=True first waits for its completion on the CPU, then
        # waits with a timeout: torch raises a completed work's error (e.g. one its watchdog
        # found first) only from a timed wait, which returns at once for a completed work.
        timed = sync and self._backend is Backend.NCCL
        if timed:
            self.wait_for(work.is_completed, op, peer=peer)
        try:
            if timed:
                work.wait(timedelta(seconds=self._timeout_s))
            else:
                work.wait()
        except RuntimeError as err:
            raise self._broken(op, err, peer=peer) from err

    def _post_p2p(
        self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]
    ) -> list[Work]:
        pg = self._usable("batch_p2p")
        if not sends and not recvs:
            return []
        peers = {p for _, p in sends} | {p for _, p in recvs}
        peer = next(iter(peers)) if len(peers) == 1 else None
        try:
            return post_p2p(pg, self._backend, self._device, sends, recvs)
        except RuntimeError as err:
            raise self._broken("batch_p2p", err, peer=peer) from err
