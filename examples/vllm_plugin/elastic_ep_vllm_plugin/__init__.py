"""vLLM plugin: vLLM's EPLB policy backed by elastic_ep's planner.

Installed beside vLLM (``pip install examples/vllm_plugin``), its ``vllm.general_plugins`` entry
point (pyproject.toml) makes vLLM call :func:`register` in every process before the model is
built; vLLM's EPLB rebalances then go through ``elastic_ep.eplb.plan`` (movement-aware when vLLM
passes the old map; see docs/planner.md). ``ELASTIC_EP_EPLB=0`` keeps vLLM's own policy without
uninstalling the plugin.
"""

from __future__ import annotations

import os
from typing import Any

from elastic_ep.adapters import vllm as adapter

ENV_SWITCH = "ELASTIC_EP_EPLB"
"""Environment variable: ``0`` leaves vLLM's policy in place; anything else (or unset) registers."""


def register(registry: dict[str, Any] | None = None) -> None:
    """The entry point: replace vLLM's ``"default"`` EPLB policy with elastic_ep's.

    Args:
        registry: the policy dict to update; vLLM's ``EPLB_POLICIES`` when ``None`` (as vLLM calls
            it).
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return
    adapter.register(registry)
