"""The worker side of :class:`~retool_plugins.rollout.vllm.VLLMRollout`'s weight sync.

vLLM mixes this class into its worker class (the ``worker_extension_cls`` engine argument), so its method can
be called by name through ``collective_rpc``. It runs in vLLM's worker process: keep its imports light.
"""

from __future__ import annotations

from typing import Any

import torch


class WeightReceiver:
    """Loads new weights, in place, from a file the trainer's process wrote with ``torch.save``.

    A file (memory-mapped here) rather than the tensors themselves through ``collective_rpc``: that channel
    carries bytes, not tensors, and sending the weights through its two process hops as bytes is several times
    slower than a file (the docs page "Rollouts" has the measurement).
    Loading goes through the worker's ``reload_weights``, which maps checkpoint names
    (``model.layers.0.self_attn.q_proj.weight``, ...) onto vLLM's fused layers and redoes any post-load
    processing (repacking for CPU kernels, quantization).
    """

    def retool_load_weights(self, path: str) -> int:
        """Load the state dict saved at ``path``; return how many tensors it held."""
        tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        reload: Any = getattr(self, "reload_weights")  # noqa: B009  # the worker class this is mixed into
        reload(weights_iterator=iter(tensors.items()))
        return len(tensors)
