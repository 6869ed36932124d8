"""Exceptions raised by elastic_ep.

Every error the library raises on purpose derives from :class:`ElasticEPError`, so an engine can
catch the whole family in one place. Bad arguments raise the built-in ``ValueError``/``TypeError``
(they are programming errors, not runtime conditions).
"""

from __future__ import annotations


class ElasticEPError(RuntimeError):
    """Base class of the runtime errors raised by elastic_ep."""


class PeerFailure(ElasticEPError):
    """A peer of a process group died or stopped answering within the timeout.

    Attributes:
        group: name of the group whose collective failed.
        epoch: epoch of that group.
        member: the member id (or rank) that failed, when known; ``None`` otherwise.
    """

    def __init__(self, message: str, *, group: str, epoch: int, member: int | None = None):
        super().__init__(message)
        self.group = group
        self.epoch = epoch
        self.member = member


class ReconfigureError(ElasticEPError):
    """Building the next epoch failed; the previous epoch's groups are still usable."""


class ScalingInProgress(ElasticEPError):
    """New work was rejected because the engine is changing its number of ranks.

    Attributes:
        retry_after_s: a hint, in seconds, for when to try again.
    """

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s
