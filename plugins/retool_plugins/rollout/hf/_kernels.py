"""The decode engine's kernels: grouped-query attention over the cache as it lies, and oneDNN linear layers.

Both compute what the model's own modules compute (log-probabilities agree to float rounding); they only do
it with fewer copies. ``fast_kernels`` switches a module onto them for one rollout and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from retool.algorithm.packing import VARLEN_ATTENTION

GROUPED_ATTENTION = "retool_grouped"  # the name under which grouped_attention is registered with transformers


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for the engine's forwards, registered with transformers as ``retool_grouped``.

    ``attention_mask`` is the engine's additive (rows, 1, queries, keys) mask. PyTorch's SDPA attends each
    key/value head with its group of query heads (``enable_gqa``), over the cache as it lies, strided views
    included. transformers' own SDPA path copies every key and value head once per query head
    (``repeat_kv``) whenever a mask is given; the same grouping written as two matrix products copies the
    strided inputs for oneDNN instead (the docs page "Rollouts" measures both).
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def supports_grouped_attention(model: torch.nn.Module) -> bool:
    """Whether the engine's masks and :func:`grouped_attention` compute what the model's own attention does.

    Every layer must attend to the whole context (no sliding window, whose mask transformers builds from
    its own 2-D masks), without logit soft-capping, through transformers' attention interface.
    """
    config = getattr(model, "config", None)
    # retool_varlen: a model the trainer packs sequences for, which is SDPA outside its packed passes.
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", GROUPED_ATTENTION,
                                                                                VARLEN_ATTENTION):  # fmt: skip
        return False
    if any(getattr(config, name, None) for name in ("attn_logit_softcapping", "attention_chunk_size")):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


@contextlib.contextmanager
def fast_kernels(module: torch.nn.Module, grouped: bool, batch_hint: int = 8) -> Iterator[None]:
    """While open, ``module`` decodes with the engine's kernels: with ``grouped``, its attention is
    :func:`grouped_attention` (the engine's masks must then be passed); on CPU, its linear layers use
    oneDNN-reordered copies of their current weights. Both are undone on exit."""
    from transformers import AttentionInterface

    from retool_plugins.rollout.hf import _packed_linears

    config = module.config
    before = config._attn_implementation
    with contextlib.ExitStack() as stack:
        if grouped:
            AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
            config._attn_implementation = GROUPED_ATTENTION
            stack.callback(setattr, config, "_attn_implementation", before)
        if _packed_linears.available(module):
            stack.enter_context(_packed_linears.packed_linears(module, batch_hint=batch_hint))
        yield
