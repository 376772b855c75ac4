"""HFRollout: decode with the training model itself, through Hugging Face transformers and its KV cache.

Every live trajectory's ``generate`` call joins one continuously batched decode loop (served by the thread
that calls ``rollout()``, see ``_engine.py``): a trajectory that returns from a code cell rejoins the batch
at the next step while the others keep decoding, and only the interpreter's tokens are prefilled, on top of
the KV cache its previous request left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import zlib
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import torch

from retool._async import run_sync
from retool.rollout.backend import Generation, GenerationRequest, RolloutBackend, RolloutResult
from retool.strategies import whole
from retool.types import Trajectory
from retool_plugins.rollout.hf._engine import DecodeEngine, EngineRequest
from retool_plugins.rollout.hf._kernels import fast_kernels, supports_grouped_attention


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
    filtered = scaled  # a new tensor already; filtered in place
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
    probs = torch.softmax(filtered, dim=-1, dtype=torch.float64)
    generators = generator if isinstance(generator, Sequence) else [generator] * probs.shape[0]
    # Inverse-CDF sampling with one uniform draw per row from the row's own generator. torch.multinomial
    # draws one exponential per vocabulary entry instead: 7 ms of a 60 ms decode step for 8 rows of 49152.
    # In float64, a zero-probability token repeats its predecessor's cumulative sum and is never found.
    cumulative = probs.cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in generators]).to(probs.device)
    point = (uniform * cumulative[:, -1])[:, None]
    tokens = torch.searchsorted(cumulative, point, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


class HFRollout(RolloutBackend):
    """Sample trajectories from the policy with a continuously batched decode loop over its HF model.

    By default it shares the training module (no second copy of the weights), so new weights need no
    transfer. With ``dtype`` it decodes with a copy of the weights in that precision instead (as verl and
    OpenRLHF sample in bfloat16 while training in fp32), refreshed from the trainer's module at the start
    of every rollout.

    Each trajectory draws its samples from a generator of its own, seeded by ``seed`` and its id, so they do
    not depend on which trajectories it was batched with. The docs page "Rollouts" measures its speed and
    what each of its kernels is worth.

    Args:
        max_batch_size: Most sequences decoded together; more wait for a free row.
        dtype: Decode with a copy of the weights in this dtype (``bfloat16`` or ``float16``); ``None`` = the
            policy's own module and dtype. bfloat16 decodes faster on GPUs and on CPUs with bfloat16 matrix
            units (AMX), slower on other CPUs. The sampler's log-probabilities then differ from the trainer's
            by the rounding (``train/sampler_logprob_diff``).
        fast_kernels: Decode with retool's kernels where they apply: a KV cache written in place, grouped-query
            attention without copying keys per query head, prompts and interpreter replies that join at the
            same step prefilled as one batch, and on CPU, linear weights reordered for oneDNN. They compute the
            same function as transformers' path (log-probabilities agree to float rounding), faster. ``False``
            decodes through transformers' own attention and cache. Models with sliding-window attention or
            soft-capped attention logits always take that path.
        **kwargs: The options of every rollout backend (``max_new_tokens``, ``max_tool_calls``, ``temperature``,
            ``top_p``, ``top_k``, ``seed``, ``format``, ``tools``).
    """

    def __init__(
        self,
        max_batch_size: int = 32,
        dtype: str | None = None,
        fast_kernels: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"HFRollout dtype must be bfloat16, float16, float32 or null; got {dtype!r}")
        self.max_batch_size = max_batch_size
        self.dtype = dtype
        self.fast_kernels = fast_kernels
        self._replica: torch.nn.Module | None = None  # the decoding copy, when dtype differs from the policy's
        self._engine: DecodeEngine | None = None
        # One generator per trajectory (keyed by request_id and seeded from it), so that a trajectory's
        # samples depend on the seed and its own id, not on which trajectories it happened to be batched with.
        self._generators: dict[str, torch.Generator] = {}

    def bind(self, model: torch.nn.Module, tokenizer: Any) -> None:
        super().bind(model, tokenizer)
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._replica = None
        wanted = getattr(torch, self.dtype) if self.dtype else None
        if wanted is not None and wanted != next(model.parameters()).dtype:
            self._replica = copy.deepcopy(model).to(wanted).eval().requires_grad_(False)

    def rollout(self, *args: Any, **kwargs: Any) -> RolloutResult:
        self._generators.clear()  # request ids are per-rollout: drop the previous rollout's generators
        if self._engine is not None:
            self._engine.forget()  # and the cache rows kept for their trajectories
        assert self.model is not None
        if self._replica is not None:
            # The trainer's weights may have changed since the last rollout (an update, a loaded checkpoint):
            # cast them into the copy (about 0.1 s for 135M parameters on CPU).
            with torch.no_grad():  # (a sharded policy's tensors are gathered whole: every rank rolls out together)
                self._replica.load_state_dict({k: whole(v) for k, v in self.model.state_dict().items()})
        was_training = self.model.training
        self.model.eval()
        try:
            with self._kernels():
                return super().rollout(*args, **kwargs)
        finally:
            self.model.train(was_training)

    def _run_loop(self, coro: Coroutine[Any, Any, list[Trajectory]]) -> list[Trajectory]:
        # Decode in this thread (the trainer's) while the tool loop runs on the background event loop: see
        # DecodeEngine for why one thread must do all of PyTorch's work.
        engine = self._get_engine()
        with engine.serving():
            return run_sync(coro, wait=engine.serve_until)

    @contextlib.contextmanager
    def _kernels(self) -> Iterator[None]:
        """For one rollout, the decoding module computes with the engine's kernels (see ``fast_kernels``)."""
        if not self.fast_kernels:
            yield
            return
        engine = self._get_engine()
        with contextlib.ExitStack() as stack:
            with self.decoding():  # reordering the weights is part of the rollout's generation time
                stack.enter_context(fast_kernels(engine.model, engine.grouped, batch_hint=min(self.max_batch_size, 8)))
            yield

    def _decoder(self) -> torch.nn.Module:
        assert self.model is not None
        return self._replica if self._replica is not None else self.model

    async def generate(self, request: GenerationRequest) -> Generation:
        if request.max_new_tokens <= 0:
            return Generation([], [], "length")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generation] = loop.create_future()

        def settle(result: Generation | None, error: BaseException | None = None) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)

        self._get_engine().submit(
            EngineRequest(
                request_id=request.request_id,
                token_ids=list(request.token_ids),
                max_new_tokens=request.max_new_tokens,
                stopped=lambda token, ids: request.stop is not None and self._stopped(request, token, ids),
                finish=lambda ids, lps, reason: loop.call_soon_threadsafe(settle, Generation(ids, lps, reason)),
                fail=lambda exc: loop.call_soon_threadsafe(settle, None, exc),
                generator=self._generator_for(request.request_id),
                cancelled=future.done,
            )
        )
        return await future

    def _get_engine(self) -> DecodeEngine:
        if self._engine is None:
            module = self._decoder()
            grouped = self.fast_kernels and supports_grouped_attention(module)
            self._engine = DecodeEngine(
                module,
                eos=self.eos_token_ids(),
                sampler=lambda logits, gens: sample_next(logits, self.temperature, self.top_p, self.top_k, gens),
                busy=self.decoding,
                max_batch_size=self.max_batch_size,
                grouped=grouped,
            )
        return self._engine

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
        if self._engine is not None:
            self._engine.close()
            self._engine = None
