"""Packed forward passes: a micro-batch's trajectories as one row without padding, and the log-probabilities of
their response tokens computed a chunk of tokens at a time.

The padded layout (:class:`~retool.algorithm.batch.PolicyBatch`) pads every row to the longest prompt plus the
longest response and materialises ``(rows, response width, vocabulary)`` logits. Here the real tokens of every
row are concatenated, position ids restart at each trajectory, and attention never crosses from one trajectory to
another (:func:`varlen_attention`: one causal attention per trajectory; on GPU, FlashAttention's variable-length
kernel where the model runs ``flash_attention_*``). The language-model head is applied only at the positions that
predict a response token, ``chunk_tokens`` positions at a time; each chunk's logits are recomputed in the backward
pass instead of kept (activation checkpointing), so the memory of the head grows with the chunk, not with the
sequence. The result is laid out as the padded path's: ``(rows, response width)``, zeros past each response.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from retool.algorithm.batch import PolicyBatch

VARLEN_ATTENTION = "retool_varlen"
"""The name :func:`varlen_attention` is registered under with transformers."""

_FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
# Configuration keys of models that change the logits after the head (soft-capping, scaling): the chunked head
# would skip that, so such models take the padded path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class PackedRows:
    """A micro-batch packed into one row, and where its response tokens go back to.

    Args:
        input_ids: (1, T) every real token of every trajectory, one trajectory after another.
        position_ids: (1, T) the position of each token within its own trajectory.
        cu_seqlens: (n + 1,) int32 offsets of the trajectories in the row (FlashAttention's layout).
        max_length: The longest trajectory.
        predictors: (K,) the row positions whose next token is a response token.
        targets: (K,) those response tokens.
        rows: (K,) the trajectory of each response token.
        columns: (K,) its column in the padded layout's response width.
        shape: (n, R), the padded layout's response shape.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    predictors: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    shape: tuple[int, int]


def pack(batch: PolicyBatch) -> PackedRows:
    """The trajectories of ``batch`` (left-padded prompts, right-padded responses) packed into one row."""
    real = batch.attention_mask.bool()
    lengths = real.sum(1)
    n, width = batch.size, batch.response_width
    prompt_width = batch.input_ids.shape[1] - width
    response_lengths = real[:, prompt_width:].sum(1)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    input_ids = batch.input_ids[real].unsqueeze(0)  # row by row, left to right: each trajectory's tokens in order
    position_ids = torch.cat([torch.arange(int(length)) for length in lengths]).unsqueeze(0)
    rows = torch.repeat_interleave(torch.arange(n), response_lengths)
    columns = torch.cat([torch.arange(int(r)) for r in response_lengths]) if n else torch.zeros(0, dtype=torch.long)
    # The response of row i starts after its prompt, at offset + (length - response length) in the packed row.
    starts = offsets[:-1] + lengths - response_lengths
    positions = starts[rows] + columns
    return PackedRows(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=offsets.to(torch.int32),
        max_length=int(lengths.max()) if n else 0,
        predictors=positions - 1,  # a prompt has at least one token, so this stays inside the trajectory
        targets=input_ids[0, positions],
        rows=rows,
        columns=columns,
        shape=(n, width),
    )


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Attention of a model that trains on packed rows, registered with transformers as ``retool_varlen``.

    In a packed pass (``cu_seq_lens_q`` given) it is causal attention within each trajectory: PyTorch's SDPA once
    per trajectory, each key/value head serving its group of query heads. Any other call (a rollout, an
    evaluation) is transformers' own SDPA attention, with the mask transformers made for it.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    edges = bounds.tolist()
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=True
        )
        for a, b in itertools.pairwise(edges)
        if b > a
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


_packing = contextvars.ContextVar("retool_packing", default=False)


def varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """The mask transformers makes for ``retool_varlen``: none in a packed pass (the trajectories' bounds say it
    all; transformers would otherwise build a (tokens x tokens) block mask from the position ids), SDPA's else."""
    if _packing.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch an SDPA ``model`` to ``retool_varlen`` for good: packed passes attend within each trajectory, other
    calls are SDPA as before. For good, not for one pass: activation checkpointing recomputes a layer in the
    backward pass, after the pass, and must find the same attention. Other kernels are left as they are
    (FlashAttention runs packed rows itself; eager attention gets transformers' block mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    config = model.config  # type: ignore[attr-defined]
    if config._attn_implementation == "sdpa":
        config._attn_implementation = VARLEN_ATTENTION


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether a packed pass computes what the padded one does for ``model``: a transformers causal LM whose
    layers all attend to the whole context (no sliding window), through transformers' attention interface, with
    a linear head whose logits are used as they come out of it."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or not isinstance(head, torch.nn.Linear):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", VARLEN_ATTENTION, *_FLASH):
        return False
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        return False
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "attention_chunk_size", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def packed_logprobs(
    model: torch.nn.Module,
    batch: PolicyBatch,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    chunk_tokens: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, R) log-probs of ``batch``'s response tokens under ``model`` (and entropies, zeros unless asked), as
    :meth:`retool.Algorithm.sequence_logprobs` returns them, from one packed pass."""
    packed = pack(batch)
    n, width = packed.shape
    if packed.targets.numel() == 0:  # nothing to score (a placeholder row): a pass that keeps ranks in step
        zeros = torch.zeros((n, width), device=device)
        with _packed_pass(model):
            out = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                        logits_to_keep=1, use_cache=False, **_bounds(packed, device))  # fmt: skip
        return zeros + 0.0 * out.logits.sum(), zeros
    with _packed_pass(model), _response_head(model, packed, temperature, with_entropy, entropy_grad, chunk_tokens):
        out = model(
            input_ids=packed.input_ids.to(device),
            position_ids=packed.position_ids.to(device),
            logits_to_keep=packed.predictors.to(device),
            use_cache=False,
            **_bounds(packed, device),
        )
    scored = out.logits[0]  # (K, 2): what _response_head returned in place of the logits
    rows, columns = packed.rows.to(device), packed.columns.to(device)
    logprobs = torch.zeros((n, width), dtype=scored.dtype, device=device).index_put((rows, columns), scored[:, 0])
    entropy = torch.zeros((n, width), dtype=scored.dtype, device=device)
    if with_entropy:  # detached unless it is a term of the loss: logged only, no graph kept
        entropies = scored[:, 1] if entropy_grad else scored[:, 1].detach()
        entropy = entropy.index_put((rows, columns), entropies)
    return logprobs, entropy


def _bounds(packed: PackedRows, device: torch.device) -> dict[str, Any]:
    cu = packed.cu_seqlens.to(device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": packed.max_length,
            "max_length_k": packed.max_length}  # fmt: skip


@contextlib.contextmanager
def _packed_pass(model: torch.nn.Module) -> Iterator[None]:
    use_varlen_attention(model)
    token = _packing.set(True)
    try:
        yield
    finally:
        _packing.reset(token)


@contextlib.contextmanager
def _response_head(
    model: torch.nn.Module,
    packed: PackedRows,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    chunk_tokens: int,
) -> Iterator[None]:
    """While open, the model's head, called by its own forward pass on the predicting positions, returns each
    one's (log-prob of its target, entropy) instead of its logits: inside the forward pass, so that a strategy's
    hooks on the head (a sharded head gathered, DeepSpeed's) run as they always do."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    targets = packed.targets

    def scored(hidden: torch.Tensor) -> torch.Tensor:
        return chunked_scores(
            hidden[0], head.weight, head.bias, targets.to(hidden.device), temperature, with_entropy, entropy_grad,
            chunk_tokens,
        ).unsqueeze(0)  # fmt: skip

    head.forward = scored
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def chunked_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    chunk_tokens: int,
) -> torch.Tensor:
    """(K, 2): for each of the K hidden states, the log-prob of its target under ``softmax(W h + b) / temperature``
    and the entropy of that distribution (0 unless ``with_entropy``), ``chunk_tokens`` at a time. Under autograd
    each chunk's logits are recomputed in the backward pass rather than kept."""
    parts = []
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], max(chunk_tokens, 1)):
        args = (hidden[start : start + chunk_tokens], weight, bias, targets[start : start + chunk_tokens])
        options = (temperature, with_entropy, entropy_grad)
        if keep_graph:
            parts.append(checkpoint(_score_chunk, *args, *options, use_reentrant=False))
        else:
            parts.append(_score_chunk(*args, *options))
    return torch.cat(parts)


def _score_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if temperature > 0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    else:
        entropy = torch.zeros_like(logprobs)
    return torch.stack([logprobs, entropy], dim=-1)
