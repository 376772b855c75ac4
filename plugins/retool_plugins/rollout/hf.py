"""HFRollout: decode with the training model itself, through Hugging Face transformers and its KV cache.

Concurrent ``generate`` calls (one per live trajectory) are gathered into a batch and decoded together in
a worker thread, so the event loop keeps running cells while the model decodes. This first version decodes
each gathered batch to its end; trajectories whose cells finish meanwhile join the next batch.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from retool.rollout.backend import Generation, GenerationRequest, RolloutBackend, RolloutResult
from retool.rollout.format import ToolFormat


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future[Generation]


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row of ``logits`` (B, V); return the tokens and their log-probabilities.

    The log-probability is taken under the temperature-scaled distribution before top-k/top-p filtering,
    which is the distribution the trainer recomputes. ``generator`` may be one generator per row, so that
    a row's samples do not depend on which other rows share its batch.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    scaled = logits / temperature
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    filtered = scaled.clone()
    if top_k > 0 and top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]
        filtered[filtered < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits[drop] = float("-inf")
        filtered = torch.full_like(filtered, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(filtered, dim=-1)
    if isinstance(generator, Sequence):
        tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    else:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


class HFRollout(RolloutBackend):
    """Sample trajectories from the policy with a batched decode loop over its Hugging Face model.

    It shares the training module (no second copy of the weights), so new weights need no transfer.

    Args:
        max_new_tokens: Budget of model-written tokens per trajectory, over all its turns.
        max_tool_calls: Code cells a trajectory may run before it is ended.
        temperature: Sampling temperature; 0 decodes greedily.
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Keep only the k most likely tokens (0 = off).
        seed: Seed of the sampler's random generator.
        format: The text format of code cells and interpreter replies (default: the paper's tags).
        tools: ``False`` turns tools off (text-only RL baseline).
        max_batch_size: Most sequences decoded together in one batch.
        gather_s: How long the scheduler waits for more requests before it starts a batch.
    """

    def __init__(
        self,
        max_new_tokens: int = 256,
        max_tool_calls: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        format: ToolFormat | None = None,
        tools: bool = True,
        max_batch_size: int = 32,
        gather_s: float = 0.002,
    ) -> None:
        super().__init__(max_new_tokens, max_tool_calls, temperature, top_p, top_k, seed, format, tools)
        self.max_batch_size = max_batch_size
        self.gather_s = gather_s
        self._queue: list[_Pending] = []
        self._scheduler: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retool-decode")
        # One generator per trajectory (keyed by request_id and seeded from it), so that a trajectory's
        # samples depend on the seed and its own id, not on which trajectories it happened to be batched with.
        self._generators: dict[str, torch.Generator] = {}
        self._decode_lock = threading.Lock()

    def rollout(self, *args: Any, **kwargs: Any) -> RolloutResult:
        self._generators.clear()  # request ids are per-rollout: drop the previous rollout's generators
        return super().rollout(*args, **kwargs)

    async def generate(self, request: GenerationRequest) -> Generation:
        if request.max_new_tokens <= 0:
            return Generation([], [], "length")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generation] = loop.create_future()
        self._queue.append(_Pending(request, future))
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = loop.create_task(self._schedule())
        return await future

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            await asyncio.sleep(self.gather_s)  # let trajectories that are about to ask join this batch
            batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
            batch = [p for p in batch if not p.future.done()]  # drop cancelled requests
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._decode, [p.request for p in batch])
            except BaseException as exc:  # surface decode errors to every waiting trajectory
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    @torch.inference_mode()
    def _decode(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Decode a batch to its end: left-padded prefill, then one token per step from the KV cache."""
        assert self.model is not None and self.tokenizer is not None
        with self._decode_lock, self.decoding():
            return self._decode_batch(requests)

    def _decode_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        from transformers import DynamicCache

        model, tokenizer = self.model, self.tokenizer
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = self.eos_token_ids()
        rows = len(requests)
        width = max(len(r.token_ids) for r in requests)
        input_ids = torch.full((rows, width), pad, dtype=torch.long)
        attention = torch.zeros((rows, width), dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - len(r.token_ids) :] = torch.tensor(r.token_ids)
            attention[i, width - len(r.token_ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        new_tokens: list[list[int]] = [[] for _ in requests]
        new_logprobs: list[list[float]] = [[] for _ in requests]
        reasons: list[str | None] = [None] * rows
        steps = max(r.max_new_tokens for r in requests)
        generators = [self._generator_for(r.request_id) for r in requests]
        try:
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            for _ in range(steps):
                tokens, logprobs = sample_next(
                    out.logits[:, -1, :], self.temperature, self.top_p, self.top_k, generators
                )
                tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
                for i, r in enumerate(requests):
                    if reasons[i] is not None:
                        continue
                    token = tokens_list[i]
                    new_tokens[i].append(token)
                    new_logprobs[i].append(logprobs_list[i])
                    if token in eos:
                        reasons[i] = "eos"
                    elif r.stop is not None and self._stopped(r, token, new_tokens[i]):
                        reasons[i] = "stop"
                    elif len(new_tokens[i]) >= r.max_new_tokens:
                        reasons[i] = "length"
                if all(reason is not None for reason in reasons):
                    break
                attention = torch.cat([attention, attention.new_ones((rows, 1))], dim=1)
                positions = positions[:, -1:] + 1
                out = model(
                    input_ids=tokens[:, None].to(device),
                    attention_mask=attention,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
        finally:
            model.train(was_training)
        return [
            Generation(t, lp, reason or "length")  # type: ignore[arg-type]
            for t, lp, reason in zip(new_tokens, new_logprobs, reasons)
        ]

    def _generator_for(self, request_id: str) -> torch.Generator:
        if request_id not in self._generators:
            seed = zlib.crc32(f"{self.seed}:{request_id}".encode())
            self._generators[request_id] = torch.Generator().manual_seed(seed)
        return self._generators[request_id]

    def _stopped(self, request: GenerationRequest, token: int, ids: list[int]) -> bool:
        piece = self.tokenizer.decode([token], skip_special_tokens=False)
        # Only a token that can finish a closing marker ('>' of </code>, '`' of a fence) needs the full check.
        if "`" not in piece and ">" not in piece:
            return False
        assert request.stop is not None
        return request.stop(self.tokenizer.decode(ids, skip_special_tokens=False))

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
