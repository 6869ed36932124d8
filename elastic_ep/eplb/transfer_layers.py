"""The operations of every layer of a transfer plan, found with numpy over all layers at once.

Per layer and new rank, a slot *changes* when it holds an expert that the rank's old slot of the
same index did not (a joining rank's slots all change). The changed slots of one rank and expert
form one *need* (its ``dst_slots``), and each need becomes one operation
(:mod:`~elastic_ep.eplb.transfer_ops`): a :class:`LocalCopy` when the rank held the expert
before, else a :class:`Transfer` from a live old rank that holds it, else a :class:`Reload`.

Everything but the choice of senders is array work over the ``[layers, ranks, slots]`` tables of
both placements: the changed slots, the needs, and per *holding* (layer, expert, live old rank
that holds it) the source slot it would send from (the lowest one the layer leaves intact, else
the lowest) and whether the layer overwrites every slot of it. The senders are chosen greedily
(scarce experts first, so their few holders are not already loaded by common ones) by: same node
as the receiver when a :class:`NodeLayout` is given; fewest experts sent in this layer; a source
slot this layer leaves intact; fewest sent in total; lowest rank. That greedy is one Python pass
over the transfers, each weighing only its expert's holders; the rest costs a few numpy passes
over the slots of both placements, so the whole grows with layers x slots.

Per layer the operations come in the order the steps (:mod:`~elastic_ep.eplb.transfer_steps`)
number them by: reloads, then local copies (both by new rank, then expert), then transfers in
the greedy's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from elastic_ep.eplb.placement import EMPTY, Placement
from elastic_ep.eplb.transfer_ops import LocalCopy, Op, Reload, Transfer
from elastic_ep.rank_mapping import RankMapping

__all__ = ["NodeLayout", "layer_ops"]

_NO_SLOT = -2
"""What a new slot is compared against where its rank had no old slot of that index."""


@dataclass(frozen=True)
class NodeLayout:
    """Node (host) of every old and every new rank, to keep transfers inside a node.

    Attributes:
        old_rank_nodes: node id of each old rank (``previous`` numbering).
        new_rank_nodes: node id of each new rank (``new`` numbering).
    """

    old_rank_nodes: tuple[int, ...]
    new_rank_nodes: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "old_rank_nodes", tuple(self.old_rank_nodes))
        object.__setattr__(self, "new_rank_nodes", tuple(self.new_rank_nodes))


@dataclass(frozen=True)
class _Holdings:
    """Per (layer, expert, live old rank holding it), sorted by layer, expert, rank.

    Attributes (``[holdings]``): ``key`` (``layer * experts + expert``), ``rank``, ``slot`` (the
    source slot: the lowest the layer leaves intact, else the lowest) and ``overwritten`` (the
    layer writes every slot of the expert on that rank).
    """

    key: np.ndarray
    rank: np.ndarray
    slot: np.ndarray
    overwritten: np.ndarray


def layer_ops(
    previous: Placement,
    new: Placement,
    mapping: RankMapping,
    dead: tuple[int, ...],
    nodes: NodeLayout | None,
) -> list[list[Op]]:
    """Every layer's operations, in the order described in the module docstring.

    Args:
        previous, new: the placements (``previous.num_ranks`` old and ``new.num_ranks`` new
            ranks, same layers and experts).
        mapping: old rank -> new rank.
        dead: old ranks that send nothing.
        nodes: if given, a sender on the receiver's node is preferred over any other.
    Returns:
        ``ops[layer]``: the layer's operations.
    """
    layers, experts = new.num_layers, new.num_logical
    old = previous.phy2log.view(layers, previous.num_ranks, -1).numpy()  # [L, R_old, S_old]
    now = new.phy2log.view(layers, new.num_ranks, -1).numpy()  # [L, R_new, S_new]
    width = min(old.shape[2], now.shape[2])
    new_to_old = np.array([-1 if o is None else o for o in mapping.new_to_old], dtype=np.int64)
    kept = np.flatnonzero(new_to_old >= 0)  # new ranks that had an old rank
    before = np.full(now.shape, _NO_SLOT, dtype=np.int64)
    before[:, kept, :width] = old[:, new_to_old[kept], :width]
    changed = (now != EMPTY) & (now != before)  # [L, R_new, S_new]
    written = np.zeros(old.shape, dtype=bool)  # [L, R_old, S_old]: old slots the layer writes
    written[:, new_to_old[kept], :width] = changed[:, kept, :width]

    # Needs: changed slots grouped by (layer, new rank, expert), slots ascending.
    layer, rank, slot = np.nonzero(changed)
    expert = now[layer, rank, slot]
    order = np.lexsort((slot, expert, rank, layer))
    layer, rank, slot, expert = layer[order], rank[order], slot[order], expert[order]
    first = _starts(layer, rank, expert)
    need_layer, need_rank, need_expert = layer[first], rank[first], expert[first]
    slots = slot.tolist()
    dst_slots = [tuple(slots[a:b]) for a, b in pairwise([*first.tolist(), len(slots)])]

    holdings = _holdings(old, written, dead, experts)
    need_key = need_layer * experts + need_expert
    start = np.searchsorted(holdings.key, need_key, side="left")
    count = np.searchsorted(holdings.key, need_key, side="right") - start
    need_old = new_to_old[need_rank]
    had = np.zeros(len(first), dtype=bool)  # the new rank held the expert before
    own = np.flatnonzero(need_old >= 0)
    had[own] = (old[need_layer[own], need_old[own], :] == need_expert[own, None]).any(axis=1)
    local = np.flatnonzero(had)
    remote = np.flatnonzero(~had & (count > 0))
    reload = np.flatnonzero(~had & (count == 0))

    copying = had[np.repeat(np.arange(len(first)), np.diff(np.append(first, len(layer))))]
    source, staged = _local_sources(
        old,
        written,
        (need_layer[local], need_old[local], need_rank[local], need_expert[local]),
        (layer[copying], rank[copying], slot[copying]),
        now.shape[1:],
    )
    ops: list[list[Op]] = [[] for _ in range(layers)]
    lays, ranks, experts_of = need_layer.tolist(), need_rank.tolist(), need_expert.tolist()
    for i in reload.tolist():
        ops[lays[i]].append(Reload(lays[i], experts_of[i], ranks[i], dst_slots[i]))
    for i, src, stage in zip(local.tolist(), source, staged, strict=True):
        ops[lays[i]].append(LocalCopy(lays[i], experts_of[i], ranks[i], src, dst_slots[i], stage))
    # The greedy's order: per layer, scarce experts first, then by expert and receiver.
    remote = remote[
        np.lexsort((need_rank[remote], need_expert[remote], count[remote], need_layer[remote]))
    ]
    senders = _choose_senders(
        holdings,
        (need_layer[remote], need_rank[remote], start[remote], count[remote]),
        nodes,
        (previous.num_ranks, new.num_ranks),
    )
    for i, (src, src_slot) in zip(remote.tolist(), senders, strict=True):
        ops[lays[i]].append(Transfer(lays[i], experts_of[i], src, src_slot, ranks[i], dst_slots[i]))
    return ops


def _local_sources(
    old: np.ndarray,
    written: np.ndarray,
    copies: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    writes: tuple[np.ndarray, np.ndarray, np.ndarray],
    new_shape: tuple[int, ...],
) -> tuple[list[int], list[bool]]:
    """Each local copy's source slot (the lowest of its expert that the layer leaves intact,
    else the lowest) and whether another local copy of its rank writes that slot (staged).

    Args:
        old, written: int64 and bool ``[L, R_old, S_old]``: the old slots, those overwritten.
        copies: layer, old rank, new rank and expert of each copy, int64 ``[copies]``.
        writes: layer, new rank and slot of every slot the copies write, int64 ``[writes]``.
        new_shape: ``(R_new, S_new)``.
    """
    layer, old_rank, new_rank, expert = copies
    held = old[layer, old_rank, :] == expert[:, None]
    intact = held & ~written[layer, old_rank, :]
    source = np.where(intact.any(axis=1), intact.argmax(axis=1), held.argmax(axis=1))
    ranks, stride = new_shape[0], max(old.shape[2], new_shape[1])
    written_keys = (writes[0] * ranks + writes[1]) * stride + writes[2]
    staged = np.isin((layer * ranks + new_rank) * stride + source, written_keys)
    return source.tolist(), staged.tolist()


def _starts(*columns: np.ndarray) -> np.ndarray:
    """Indices where any of the (sorted) ``columns`` changes value: each group's first row."""
    if not len(columns[0]):
        return np.zeros(0, dtype=np.int64)
    change = np.zeros(len(columns[0]), dtype=bool)
    change[0] = True
    for column in columns:
        change[1:] |= column[1:] != column[:-1]
    return np.flatnonzero(change)


def _holdings(
    old: np.ndarray, written: np.ndarray, dead: tuple[int, ...], experts: int
) -> _Holdings:
    """The :class:`_Holdings` of ``old`` (int64 ``[L, R_old, S_old]``), given the old slots each
    layer writes (bool, same shape) and the dead old ranks."""
    live = np.ones(old.shape[1], dtype=bool)
    live[list(dead)] = False
    layer, rank, slot = np.nonzero((old != EMPTY) & live[None, :, None])
    expert = old[layer, rank, slot]
    overwritten = written[layer, rank, slot]
    # Within a holding, an intact slot first, then the lowest.
    order = np.lexsort((slot, overwritten, rank, expert, layer))
    key = (layer * experts + expert)[order]
    rank, slot, overwritten = rank[order], slot[order], overwritten[order]
    first = _starts(key, rank)
    return _Holdings(key[first], rank[first], slot[first], overwritten[first])


def _choose_senders(
    holdings: _Holdings,
    needs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    nodes: NodeLayout | None,
    world_sizes: tuple[int, int],
) -> list[tuple[int, int]]:
    """The greedy: per need (``needs``: its layer, new rank, first holding and holdings, each
    int64 ``[remote needs]``, in the greedy's order) the ``(old rank, slot)`` that sends it."""
    old_nodes = nodes.old_rank_nodes if nodes is not None else (0,) * world_sizes[0]
    new_nodes = nodes.new_rank_nodes if nodes is not None else (0,) * world_sizes[1]
    ranks, slots = holdings.rank.tolist(), holdings.slot.tolist()
    overwritten = holdings.overwritten.tolist()
    total_sent = [0] * world_sizes[0]
    layer_sent = total_sent
    current = -1
    chosen = []
    for layer, receiver, start, count in zip(*(column.tolist() for column in needs), strict=True):
        if layer != current:
            layer_sent, current = [0] * world_sizes[0], layer
        node = new_nodes[receiver]
        best, best_key = start, (2, 0, 2, 0, 0)
        for j in range(start, start + count):
            o = ranks[j]
            key = (old_nodes[o] != node, layer_sent[o], overwritten[j], total_sent[o], o)
            if j == start or key < best_key:
                best, best_key = j, key
        o = ranks[best]
        layer_sent[o] += 1
        total_sent[o] += 1
        chosen.append((o, slots[best]))
    return chosen
