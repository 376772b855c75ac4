"""VLLMRollout: decode with vLLM's V1 engine, which holds its own copy of the policy's weights.

The parts: ``rollout.py`` (the plugin: the engine, requests, weight sync) and ``_worker.py`` (the weight
receiver vLLM mixes into its worker). vLLM's worker process imports ``_worker.py``, which runs this file
first, so it loads the plugin class only on first access: the worker never imports retool's core.
"""

from __future__ import annotations

from typing import Any

__all__ = ["INSTALL_HINT", "VLLMRollout", "cpu_engine_env", "gpu_engine_env"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from retool_plugins.rollout.vllm import rollout

        return getattr(rollout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
