"""Stateless process groups that are rebuilt inside live processes, and elastic membership.

- :class:`Rendezvous`: the job's one long-lived TCPStore, with a key prefix per (group, epoch).
- :class:`StatelessGroup`: a gloo/NCCL process group outside torch's registry, for one
  ``(name, epoch)``; PeerFailure within its timeout when a peer dies.
- :class:`ElasticWorld`: member ids, epochs, standby groups (prepare/commit), joiners, recovery;
  :class:`GroupLayout` names its sub-groups.
"""

from elastic_ep.groups.backend import Backend
from elastic_ep.groups.layout import GroupLayout
from elastic_ep.groups.rendezvous import Rendezvous
from elastic_ep.groups.stateless_group import (
    GroupClosedError,
    P2PBatch,
    StatelessGroup,
    WorkHandle,
)
from elastic_ep.groups.world import WORLD, ElasticWorld, MemberState, PendingEpoch

__all__ = [
    "WORLD",
    "Backend",
    "ElasticWorld",
    "GroupClosedError",
    "GroupLayout",
    "MemberState",
    "P2PBatch",
    "PendingEpoch",
    "Rendezvous",
    "StatelessGroup",
    "WorkHandle",
]
