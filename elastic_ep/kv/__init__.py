"""KV-cache budget agreement: :func:`sync_kv_budget` (MIN all-reduce, joiners pass None)."""

from elastic_ep.kv.budget import (
    UNKNOWN,
    KVBudgetUnknownError,
    kv_blocks_for_budget,
    sync_kv_budget,
)

__all__ = ["UNKNOWN", "KVBudgetUnknownError", "kv_blocks_for_budget", "sync_kv_budget"]
