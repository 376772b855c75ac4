"""The worker side of :class:`~retool_plugins.rollout.vllm.VLLMRollout`'s weight sync.

vLLM mixes this class into its worker class (the ``worker_extension_cls`` engine argument), so its method can
be called by name through ``collective_rpc``. It runs in vLLM's worker process: keep its imports light.
"""

from __future__ import annotations

import io
from typing import Any

import torch


class WeightReceiver:
    """Receives new weights in chunks (``torch.save`` bytes) and loads them in place once the last arrives.

    vLLM's RPC channel carries bytes but not tensors, and one message must stay well below msgpack's 4 GiB
    limit, hence serialized chunks. Loading goes through the worker's ``reload_weights``, which maps checkpoint
    names (``model.layers.0.self_attn.q_proj.weight``, ...) onto vLLM's fused layers and redoes any
    post-load processing (repacking for CPU kernels, quantization).
    """

    _retool_pending: list[tuple[str, torch.Tensor]]

    def retool_receive_weights(self, blob: bytes, last: bool) -> int:
        """Add one chunk; on the ``last`` one load everything received. Returns the number of tensors loaded."""
        chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        pending = getattr(self, "_retool_pending", [])
        pending.extend(chunk.items())
        self._retool_pending = pending
        if not last:
            return 0
        self._retool_pending = []
        reload: Any = getattr(self, "reload_weights")  # noqa: B009  # the worker class this is mixed into
        reload(weights_iterator=iter(pending))
        return len(pending)
