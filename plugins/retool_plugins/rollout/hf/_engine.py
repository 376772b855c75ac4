"""A continuous-batching decode engine over a Hugging Face causal LM and one shared KV cache.

It computes in the thread that serves it (a rollout's calling thread; see ``DecodeEngine``). Requests join
the running batch at the next decode step (no waiting for the batch to finish) and leave it the step they
finish, so a trajectory that comes back from a code cell is
decoding again within one step. When a request stops at a code cell, its row of the KV cache is kept; the
trajectory's next request (the same tokens plus the interpreter's reply) prefills only the new tokens.

Layout: the batch cache is left-padded. Row ``i`` holds its ``real[i]`` tokens in the last ``real[i]``
columns; ``attention`` marks them. Joining rows are left-padded to the batch width (or the batch to theirs),
and all-padding columns on the left are trimmed when rows leave.

Two things make a decode step cheaper than transformers' defaults, and neither changes what is computed:

* The cache (:func:`column_cache`) keeps spare columns, so a step writes its keys and values in place;
  transformers' ``DynamicCache`` concatenates, copying the whole cache at every step (a sixth of a step's
  time on CPU).
* With ``grouped=True`` the engine passes its own additive 4-D masks and the model attends through
  :func:`grouped_attention` (SDPA with ``enable_gqa``), where transformers' SDPA path first copies every key
  and value once per query head (``repeat_kv``) whenever a padding mask is given. The engine's masks also
  let the prompts and the interpreter replies that join at the same step be prefilled as one padded batch.

One class, because the batch's rows, their cache columns and the requests they belong to change together at
every step: admitting, prefilling, decoding and releasing a row are one piece of bookkeeping.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from retool_plugins.rollout.hf._cache import ROOM, Layers, column_cache

Sampler = Callable[[torch.Tensor, list[torch.Generator]], tuple[torch.Tensor, torch.Tensor]]

_PREFILL_TOKENS = 8192  # most tokens (rows x padded length) in one batched prefill
_PAD_SLACK = 512  # padding tokens a batched prefill may always add
_WAKE = object()  # put in the inbox to wake a serving thread that waits for requests


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
    layers: Layers  # per layer (1, heads, len, dim)


class DecodeEngine:
    """Owns the batch and its KV cache; thread-safe ``submit``.

    The engine computes in whichever thread serves it, one thread at a time. A rollout serves it from the
    thread that called ``rollout()`` (:meth:`serve_until`), the thread that also trains: GNU OpenMP, which
    PyTorch's CPU builds use, gives every thread that computes its own team of worker threads, and once a
    process holds more of them than there are cores, every team stops spinning between parallel regions and
    sleeps instead, which slows every step for as long as the process lives (the docs page "Rollouts" has the
    measurement). Requests submitted while nobody serves (``generate`` called
    directly, outside a rollout) are served by a helper thread that exits when they are done.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eos: set[int],
        sampler: Sampler,
        busy: Callable[[], Any],
        max_batch_size: int = 32,
        grouped: bool = False,
        gather_s: float = 0.02,
    ) -> None:
        self.model = model
        self.eos = eos
        self.sampler = sampler
        self.busy = busy  # a context manager factory that accounts decode time
        self.max_batch_size = max_batch_size
        # grouped: the engine's own 4-D masks, grouped_attention and batched prefills (the model must be in
        # the GROUPED_ATTENTION implementation while it decodes); otherwise 2-D masks, one prefill per request.
        self.grouped = grouped
        # An idle engine that receives a request waits this long for others (trajectories whose cells ran
        # together come back together), so that they are prefilled as one batch, not one after another.
        self.gather_s = gather_s
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._inbox: queue.SimpleQueue[EngineRequest | object | None] = queue.SimpleQueue()
        self._serving = threading.Lock()  # held by the one thread that computes
        self._waiting: list[EngineRequest] = []
        self._joining: list[EngineRequest] = []  # taken from _waiting, being prefilled
        self._rows: list[EngineRequest] = []
        self._real: list[int] = []  # real (non-pad) tokens of each row in the cache
        self._cache: Any = None
        self._attention: torch.Tensor | None = None  # (rows, width): 1 where a column is a real token
        self._logits: torch.Tensor | None = None  # (rows, vocab): the next-token logits of each row
        self._kept: dict[str, _Kept] = {}
        self._closed = False

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(request)
        self._help()

    def forget(self) -> None:
        """Drop kept cache rows (between rollouts: their trajectories are over)."""
        self._inbox.put(None)

    def close(self) -> None:
        self._closed = True
        self._inbox.put(_WAKE)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Make the calling thread the engine's server (waiting for a helper thread to finish first)."""
        with self._serving:
            yield

    def serve_until(self, future: Future[Any]) -> None:
        """Decode in the calling thread, which holds :meth:`serving`, until ``future`` is done."""
        future.add_done_callback(lambda _: self._inbox.put(_WAKE))
        while not future.done() and not self._closed:
            self._turn()
        if self._closed:  # closed under a running rollout: its requests will not be decoded
            self._collect(block=False)
            for request in self._rows + self._waiting:
                request.fail(RuntimeError("the decode engine was closed"))
            self._rows, self._waiting = [], []

    # ---- the serving thread ---------------------------------------------------------------------------

    def _help(self) -> None:
        """Start a helper thread to serve, unless a thread serves already."""
        if not self._closed and self._serving.acquire(blocking=False):
            threading.Thread(target=self._serve_while_busy, name="retool-decode", daemon=True).start()

    def _serve_while_busy(self) -> None:
        try:
            while not self._closed:
                self._turn()
                if not self._rows and not self._waiting and self._inbox.empty():
                    break
        finally:
            self._serving.release()
        if not self._inbox.empty():  # submitted after the last look, while the lock was still held
            self._help()

    def _turn(self) -> None:
        """Take what arrived (waiting for it when nothing decodes), admit it, and run one decode step."""
        idle = not self._rows
        self._collect(block=idle)
        if not self._rows and not self._waiting:
            return
        if idle and self.grouped:
            self._gather()
        try:
            # The serving thread may be the trainer's, inside Lightning's autocast region (bf16-mixed):
            # decoding computes in the weights' own dtype all the same.
            with torch.inference_mode(), torch.autocast(self.device.type, enabled=False), self.busy():
                self._admit()
                if self._rows:
                    self._step()
        except BaseException as exc:  # fail every request in flight; the engine itself lives on
            # Never hand a KeyboardInterrupt to a request: raised inside the event loop, it would stop the loop.
            error = exc if isinstance(exc, Exception) else RuntimeError(f"decoding was interrupted ({exc!r})")
            for request in self._rows + self._joining + self._waiting:
                request.fail(error)
            self._rows, self._joining, self._waiting, self._real = [], [], [], []
            self._cache = self._attention = self._logits = None
            if not isinstance(exc, Exception):  # Ctrl-C in the serving thread: after cleaning up, go on up
                raise

    def _collect(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._take(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _take(self, item: EngineRequest | object | None) -> None:
        if item is None:
            self._kept.clear()
        elif isinstance(item, EngineRequest):
            self._waiting.append(item)

    def _gather(self) -> None:
        """Wait up to ``gather_s`` for more requests while they keep arriving (2 ms apart at most)."""
        deadline = time.monotonic() + self.gather_s
        while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            try:
                self._take(self._inbox.get(timeout=min(0.002, left)))
            except queue.Empty:
                return

    def _admit(self) -> None:
        room = self.max_batch_size - len(self._rows)
        joining, self._waiting = self._waiting[:room], self._waiting[room:]
        self._joining = [request for request in joining if not request.cancelled()]
        if self.grouped:
            groups = _prefill_groups(self._joining, [len(self._uncached(r)[1]) for r in self._joining])
        else:
            groups = [[request] for request in self._joining]
        for group in groups:
            self._join(group, *self._prefill(group))
        self._joining = []  # (on an error, those already joined are failed twice: the second is a no-op)

    def _uncached(self, request: EngineRequest) -> tuple[_Kept | None, list[int]]:
        """The kept cache row a request continues (if any) and the tokens it still has to prefill."""
        kept = self._kept.get(request.request_id)
        if kept is not None and request.token_ids[: len(kept.token_ids)] != kept.token_ids:
            kept = None  # not a continuation of what we kept: start over
        start = len(kept.token_ids) if kept is not None else 0
        if kept is not None and start == len(request.token_ids):
            # Everything is cached but the last token's logits: drop that token from the row and run it again.
            kept = _Kept(kept.token_ids[:-1], [(k[:, :, :-1], v[:, :, :-1]) for k, v in kept.layers])
            start -= 1
        return kept, request.token_ids[start:]

    def _prefill(self, group: list[EngineRequest]) -> tuple[list[int], list[int], Layers, torch.Tensor]:
        """Run the group's uncached tokens through the model as one batch, on top of their kept rows.

        Returns each row's cached and new token counts, the batch's keys and values per layer and the last
        token's logits of each row. Row ``i`` of the layers is laid out as ``[pad | kept | pad | new]``: kept
        rows left-padded to the longest, new tokens left-padded to the longest, so that every row's last token
        is in the last column. :meth:`_join` squeezes the padding out.
        """
        parts = [self._uncached(request) for request in group]
        for request in group:
            self._kept.pop(request.request_id, None)
        cached = [len(kept.token_ids) if kept is not None else 0 for kept, _ in parts]
        new = [len(ids) for _, ids in parts]
        # Rows with nothing cached and the same tokens (a GRPO group's trajectories, which share their prompt)
        # are computed once and copied, as vLLM's prefix cache would.
        first: dict[Any, int] = {}
        unique: list[int] = []
        inverse: list[int] = []
        for i, (kept, ids) in enumerate(parts):
            key = tuple(ids) if kept is None else i
            if key not in first:
                first[key] = len(unique)
                unique.append(i)
            inverse.append(first[key])
        layers, logits = self._forward(*([seq[i] for i in unique] for seq in (parts, cached, new)))
        if len(unique) < len(parts):
            index = torch.tensor(inverse, device=self.device)
            layers = [(k[index], v[index]) for k, v in layers]
            logits = logits[index]
        return cached, new, layers, logits

    def _forward(
        self, parts: list[tuple[_Kept | None, list[int]]], cached: list[int], new: list[int]
    ) -> tuple[Layers, torch.Tensor]:
        rows, width, length = len(parts), max(cached), max(new)
        if width:  # the kept rows, right-aligned in zeroed buffers with room for the new tokens
            some = next(kept for kept, _ in parts if kept is not None).layers
            buffers = []
            for index, (k0, _) in enumerate(some):
                pair = [k0.new_zeros((rows, k0.shape[1], width + length, k0.shape[3])) for _ in range(2)]
                for i, ((kept, _), c) in enumerate(zip(parts, cached)):
                    if kept is not None:
                        for buffer, t in zip(pair, kept.layers[index]):
                            buffer[i, :, width - c : width] = t[0]
                buffers.append((pair[0], pair[1]))
            cache = column_cache(buffers, used=width)
        else:
            cache = column_cache()
        ids = torch.zeros((rows, length), dtype=torch.long)
        positions = torch.zeros((rows, length), dtype=torch.long)
        real = torch.zeros((rows, width + length), dtype=torch.bool)
        for i, ((_, tokens), n, c) in enumerate(zip(parts, new, cached)):
            ids[i, length - n :] = torch.tensor(tokens)
            positions[i, length - n :] = torch.arange(c, c + n)
            real[i, width - c : width] = True
            real[i, width + length - n :] = True
        if self.grouped:
            mask = self._prefill_mask(real, width, length)
        else:  # one request, nothing padded: transformers builds the causal mask from a 2-D one
            assert rows == 1 and width == cached[0] and length == new[0]
            mask = real.long().to(self.device)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask,
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return layers, out.logits[:, -1, :]

    def _prefill_mask(self, real: torch.Tensor, width: int, length: int) -> torch.Tensor:
        """Additive (rows, 1, length, width + length) mask: a query sees the real kept columns and the real new
        tokens up to itself. A padding query also sees itself, so that no row of the softmax is empty."""
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        visible = real[:, None, :].repeat(1, length, 1)
        visible[:, :, width:] &= causal
        visible[:, :, width:] |= torch.eye(length, dtype=torch.bool)
        return self._additive(visible[:, None])

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~visible.to(self.device), torch.finfo(self.dtype).min)

    def _join(
        self, group: list[EngineRequest], cached: list[int], new: list[int], layers: Layers, logits: torch.Tensor
    ) -> None:
        """Add the prefilled rows to the batch: squeeze out their padding and left-pad everything to one width."""
        lengths = [c + n for c, n in zip(cached, new)]
        prefilled = layers[0][0].shape[2]
        old = self._attention.shape[1] if self._attention is not None else 0
        width = max(old, *lengths)
        batch = len(self._rows) + len(group)
        attention = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        if self._attention is not None:
            attention[: len(self._rows), width - old :] = self._attention
        for i, size in enumerate(lengths):
            attention[len(self._rows) + i, width - size :] = 1
        tail = prefilled - max(new)  # where the new tokens' block starts in a prefilled row
        merged = []
        for index, (k, v) in enumerate(layers):
            pair = []
            for part, current in ((k, self._cache.layers[index].keys if self._cache else None),
                                  (v, self._cache.layers[index].values if self._cache else None)):  # fmt: skip
                out = part.new_zeros((batch, part.shape[1], width + ROOM, part.shape[3]))
                if current is not None:
                    out[: len(self._rows), :, width - old : width] = current
                for i, (c, n) in enumerate(zip(cached, new)):
                    row = len(self._rows) + i
                    out[row, :, width - n : width] = part[i, :, prefilled - n :]
                    if c:
                        out[row, :, width - n - c : width - n] = part[i, :, tail - c : tail]
                pair.append(out)
            merged.append((pair[0], pair[1]))
        self._cache = column_cache(merged, used=width)
        self._attention = attention
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits], dim=0)
        self._rows.extend(group)
        self._real.extend(lengths)

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
        mask = self._additive(self._attention[:, None, None, :].bool()) if self.grouped else self._attention
        out = self.model(
            input_ids=tokens[:, None].to(self.device),
            attention_mask=mask,
            position_ids=torch.tensor(self._real, device=self.device)[:, None],
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
            layer.adopt(layer.keys[index, :, trim:], layer.values[index, :, trim:])
        self._attention = self._attention[index, trim:]
        self._logits = self._logits[index]


def _prefill_groups(requests: list[EngineRequest], new: list[int]) -> list[list[EngineRequest]]:
    """Split the requests joining at one step into batches of at most ``_PREFILL_TOKENS`` padded tokens, in
    which padding adds at most as many tokens as are real, or ``_PAD_SLACK`` (short rows pad cheaply)."""
    groups: list[list[EngineRequest]] = []
    real = 0
    for length, request in sorted(zip(new, requests), key=lambda pair: pair[0]):
        padded = length * (len(groups[-1]) + 1) if groups else 0
        if groups and padded <= _PREFILL_TOKENS and padded - (real + length) <= max(real + length, _PAD_SLACK):
            groups[-1].append(request)
            real += length
        else:
            groups.append([request])
            real = length
    return groups
