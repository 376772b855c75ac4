"""A continuous-batching decode engine over a Hugging Face causal LM and one shared KV cache.

It runs in its own thread. Requests join the running batch at the next decode step (no waiting for the
batch to finish) and leave it the step they finish, so a trajectory that comes back from a code cell is
decoding again within one step. When a request stops at a code cell, its row of the KV cache is kept; the
trajectory's next request (the same tokens plus the interpreter's reply) prefills only the new tokens.

Layout: the batch cache is left-padded. Row ``i`` holds its ``real[i]`` tokens in the last ``real[i]``
columns; ``attention`` marks them. A joining row is left-padded to the batch width (or the batch to its
width), and all-padding columns on the left are trimmed when rows leave.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Sampler = Callable[[torch.Tensor, list[torch.Generator]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EngineRequest:
    """One request as the engine sees it; ``finish`` is called (from the engine thread) with the result."""

    request_id: str
    token_ids: list[int]
    max_new_tokens: int
    stopped: Callable[[int, list[int]], bool]  # (new token, tokens so far) -> a code cell closed
    finish: Callable[[list[int], list[float], str], None]
    fail: Callable[[BaseException], None]
    generator: torch.Generator
    cancelled: Callable[[], bool] = lambda: False
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _Kept:
    """A finished request's cache row, for its trajectory's next request."""

    token_ids: list[int]  # the tokens whose keys and values are in ``layers``
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, heads, len, dim)


class DecodeEngine:
    """Owns the decode thread, the batch and its KV cache. Thread-safe ``submit``; everything else runs inside."""

    def __init__(
        self,
        model: torch.nn.Module,
        eos: set[int],
        sampler: Sampler,
        busy: Callable[[], Any],
        max_batch_size: int = 32,
    ) -> None:
        self.model = model
        self.eos = eos
        self.sampler = sampler
        self.busy = busy  # a context manager factory that accounts decode time
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self._inbox: queue.SimpleQueue[EngineRequest | None] = queue.SimpleQueue()
        self._waiting: list[EngineRequest] = []
        self._rows: list[EngineRequest] = []
        self._real: list[int] = []  # real (non-pad) tokens of each row in the cache
        self._cache: Any = None
        self._attention: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None  # (rows, vocab): the next-token logits of each row
        self._kept: dict[str, _Kept] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="retool-decode", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(request)

    def forget(self) -> None:
        """Drop kept cache rows (between rollouts: their trajectories are over)."""
        self._inbox.put(None)

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)

    # ---- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._collect(block=not self._rows)
            if not self._rows and not self._waiting:
                continue
            try:
                with torch.inference_mode(), self.busy():
                    self._admit()
                    if self._rows:
                        self._step()
            except BaseException as exc:  # fail every request in flight; the engine itself lives on
                for request in self._rows + self._waiting:
                    request.fail(exc)
                self._rows, self._waiting, self._real = [], [], []
                self._cache = self._attention = self._logits = None

    def _collect(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._kept.clear()
                else:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _admit(self) -> None:
        room = self.max_batch_size - len(self._rows)
        joining, self._waiting = self._waiting[:room], self._waiting[room:]
        for request in joining:
            if request.cancelled():
                continue
            layers, logits = self._prefill(request)
            self._join(request, layers, logits)

    def _prefill(self, request: EngineRequest) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Run the request's uncached tokens through the model; return its cache row and last logits."""
        from transformers import DynamicCache

        kept = self._kept.pop(request.request_id, None)
        if kept is not None and request.token_ids[: len(kept.token_ids)] != kept.token_ids:
            kept = None  # not a continuation of what we kept: start over
        start = len(kept.token_ids) if kept is not None else 0
        new = request.token_ids[start:]
        if not new:  # everything is cached but the last token's logits: recompute the last token
            start -= 1
            new = request.token_ids[start:]
            kept = _Kept(kept.token_ids[:-1], [(k[:, :, :-1], v[:, :, :-1]) for k, v in kept.layers]) if kept else None
        cache = DynamicCache(ddp_cache_data=kept.layers) if kept is not None else DynamicCache()
        ids = torch.tensor([new], device=self.device)
        positions = torch.arange(start, start + len(new), device=self.device)[None]
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones((1, start + len(new)), dtype=torch.long, device=self.device),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return layers, out.logits[:, -1, :]

    def _join(
        self, request: EngineRequest, layers: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor
    ) -> None:
        from transformers import DynamicCache

        length = layers[0][0].shape[2]
        row_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache = DynamicCache(ddp_cache_data=layers)
            self._attention, self._logits = row_mask, logits
        else:
            assert self._attention is not None and self._logits is not None
            width = self._attention.shape[1]
            grow, pad_row = max(0, length - width), max(0, width - length)
            for layer, (k, v) in zip(self._cache.layers, layers):
                layer.keys = torch.cat([_left_pad(layer.keys, grow), _left_pad(k, pad_row)], dim=0)
                layer.values = torch.cat([_left_pad(layer.values, grow), _left_pad(v, pad_row)], dim=0)
            self._attention = torch.cat([_left_pad(self._attention, grow), _left_pad(row_mask, pad_row)], dim=0)
            self._logits = torch.cat([self._logits, logits], dim=0)
        self._rows.append(request)
        self._real.append(length)

    def _step(self) -> None:
        """Sample one token for every row, retire finished rows, and run one decode step for the rest."""
        assert self._logits is not None and self._attention is not None
        tokens, logprobs = self.sampler(self._logits, [r.generator for r in self._rows])
        tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
        keep: list[int] = []
        for i, request in enumerate(self._rows):
            token = tokens_list[i]
            request.tokens.append(token)
            request.logprobs.append(logprobs_list[i])
            if request.cancelled():
                continue
            reason = None
            if token in self.eos:
                reason = "eos"
            elif request.stopped(token, request.tokens):
                reason = "stop"
                self._keep_row(i, request)
            elif len(request.tokens) >= request.max_new_tokens:
                reason = "length"
            if reason is None:
                keep.append(i)
            else:
                request.finish(request.tokens, request.logprobs, reason)
        if len(keep) < len(self._rows):
            self._select(keep)
            tokens = tokens[keep]
        if not self._rows:
            return
        assert self._attention is not None
        self._attention = torch.cat([self._attention, self._attention.new_ones((len(self._rows), 1))], dim=1)
        positions = torch.tensor(self._real, device=self.device)[:, None]
        out = self.model(
            input_ids=tokens[:, None].to(self.device),
            attention_mask=self._attention,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._real = [n + 1 for n in self._real]
        self._logits = out.logits[:, -1, :]

    def _keep_row(self, i: int, request: EngineRequest) -> None:
        """Save row ``i``'s cache: the request's tokens and all generated ones but the last (not yet run)."""
        real = self._real[i]
        layers = [(layer.keys[i : i + 1, :, -real:].clone(), layer.values[i : i + 1, :, -real:].clone())
                  for layer in self._cache.layers]  # fmt: skip
        self._kept[request.request_id] = _Kept(request.token_ids + request.tokens[:-1], layers)

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._real = [], []
            self._cache = self._attention = self._logits = None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._real = [self._real[i] for i in keep]
        assert self._attention is not None and self._logits is not None
        trim = self._attention.shape[1] - max(self._real)  # left columns that are padding in every kept row
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
        self._attention = self._attention[index, trim:]
        self._logits = self._logits[index]


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with ``n`` zero columns prepended on its sequence axis (dim 2 for cache tensors, 1 for masks)."""
    if n == 0:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
