"""The base of every training algorithm: a LightningModule built from the recipe's components.

What every algorithm shares lives here: the injected components (policy, rollout backend, executor, reward)
and the check that a recipe gave the ones it needs; loading the policy; the optimizer, gradient clipping and
the optimizer step that leaves ``trainer.global_step`` alone; log-probabilities of response tokens; the
step's record for the console and the run directory; evaluation on held-out problems; and the export in
Hugging Face format. What one training step does is the subclass's: an RL step
(:class:`~retool.algorithm.PolicyGradient`) or a supervised one (``SFT``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from retool import distributed
from retool._async import run_sync
from retool.algorithm.batch import PolicyBatch
from retool.algorithm.checkpoints import Checkpoints
from retool.algorithm.evaluation import Evaluation
from retool.algorithm.packing import packed_logprobs, supports_packing
from retool.algorithm.processes import Processes
from retool.executor import Executor
from retool.policy import Policy
from retool.reward import Reward
from retool.rollout.backend import RolloutBackend
from retool.strategies import whole_norm
from retool.tables import STEP_COLUMNS
from retool.types import EvalRecord, StepRecord


class Algorithm(Evaluation, Processes, Checkpoints, L.LightningModule):
    """Base class of training algorithms.

    The policy, rollout backend, executor and reward are injected from the recipe's other sections; the
    arguments below are this section's own, shared by every algorithm. A subclass adds its own options and
    passes these on by keyword (``**kwargs``), and implements ``training_step``, ending it with
    :meth:`record_step`.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: Clip the global gradient norm to this (0 = no clipping; the norm is logged either way).
        micro_batch_size: Sequences per forward/backward pass of each process (gradient accumulation); lower it to
            save memory.
        max_tokens_per_micro_batch: Form each process's forward/backward passes by tokens instead: as many
            sequences as fit in this many tokens (prompt and response; at least one sequence a pass). ``None``:
            ``micro_batch_size`` sequences a pass.
        pack_sequences: Pack a pass's sequences into one row without padding (attention stays within each
            sequence) and compute the response tokens' log-probs ``logprob_chunk_tokens`` at a time, never the
            whole ``(tokens, vocabulary)`` logits. ``False``: the padded path (every row padded to the longest
            prompt plus the longest response). Models whose attention or logits the packed pass cannot reproduce
            (sliding windows, soft-capped logits) take the padded path either way.
        logprob_chunk_tokens: Positions whose logits exist at once in the packed path (the peak memory of the
            language-model head grows with it, not with the sequence).
        eval_every: Evaluate on the dataset's ``val`` problems every this many steps. A run that evaluates at
            all (``eval_every > 0`` or ``eval_at_start``) also evaluates at its end; with both off, only
            ``retool validate`` does. See :meth:`validation_step`.
        eval_samples: Besides the greedy pass, sample this many answers per problem at the rollout's
            temperature and report avg@k (mean accuracy) and pass@k (any correct); 0 = greedy only.
        eval_at_start: Evaluate once before the first step (the "before" row of a before/after table).
        eval_batch_size: Problems per evaluation batch, over all processes (default: the data's ``batch_size``).
        policy: Injected from the recipe's ``policy`` section.
        rollout: Injected from the recipe's ``rollout`` section.
        executor: Injected from the recipe's ``executor`` section.
        reward: Injected from the recipe's ``reward`` section.
    """

    train_on = "problems"
    """What the training batches hold: ``"problems"`` (RL rolls them out) or ``"traces"`` (supervised)."""

    table_columns: tuple[tuple[str, str, str], ...] = tuple(STEP_COLUMNS)
    """(header, metric key, format) of the row the console prints after each step."""

    def __init__(
        self,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 4,
        max_tokens_per_micro_batch: int | None = None,
        pack_sequences: bool = True,
        logprob_chunk_tokens: int = 1024,
        eval_every: int = 0,
        eval_samples: int = 0,
        eval_at_start: bool = False,
        eval_batch_size: int | None = None,
        policy: Policy | None = None,
        rollout: RolloutBackend | None = None,
        executor: Executor | None = None,
        reward: Reward | None = None,
    ) -> None:
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < 1:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 1 or null, got {max_tokens_per_micro_batch}")
        if logprob_chunk_tokens < 1:
            raise ValueError(f"logprob_chunk_tokens must be >= 1, got {logprob_chunk_tokens}")
        if eval_every < 0 or eval_samples < 0:
            raise ValueError(f"eval_every and eval_samples must be >= 0, got {eval_every} and {eval_samples}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null, got {eval_batch_size}")
        self.automatic_optimization = False
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.pack_sequences = pack_sequences
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.eval_every = eval_every
        self.eval_samples = eval_samples
        self.eval_at_start = eval_at_start
        self.eval_batch_size = eval_batch_size
        self.keep_resources_open = False  # set by a caller that runs several stages (validate, fit, validate)
        self.last_step: StepRecord | None = None
        self.last_evaluation: EvalRecord | None = None
        self.policy = policy if policy is not None else Policy()
        self.rollout = rollout
        self.executor = executor
        self.reward = reward
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._averages_gradients = False  # set in on_fit_start: DDP, whose gradients retool averages itself

    # ---- components ---------------------------------------------------------------------------------------

    trained_modules: tuple[str, ...] = ("policy",)
    """Names of the modules this algorithm trains, each with its own optimizer (known before they load)."""

    def setup(self, stage: str) -> None:
        # Runs before configure_model: a recipe that lacks a section fails here, before any weights load.
        self.check_components()
        self.check_strategy(self.trainer.strategy)

    def check_strategy(self, strategy: Any) -> None:
        """Raise ``ValueError`` (naming the fix) if ``strategy`` cannot train this algorithm: one that takes fewer
        optimizers (``max_optimizers``: DeepSpeed's one) than the modules it trains."""
        limit = getattr(strategy, "max_optimizers", None)
        modules = self.trained_modules
        if limit is not None and len(modules) > limit:
            raise ValueError(
                f"{type(self).__name__} trains {len(modules)} modules ({', '.join(modules)}), each with its own "
                f"optimizer, and {type(strategy).__name__} takes {limit}: use strategy fsdp2 (sharded) or ddp"
            )

    def check_components(self) -> None:
        """Raise ``ValueError`` (naming the fix) unless every component this algorithm needs was given.

        The default asks for what rolling out and scoring needs: a rollout backend and a reward, and an
        executor when the rollout runs code.
        """
        if self.rollout is None or self.reward is None:
            missing = [name for name in ("rollout", "reward") if getattr(self, name) is None]
            raise ValueError(f"{type(self).__name__} needs the recipe section(s) {', '.join(missing)}")
        if self.eval_samples and self.rollout.temperature == 0:
            raise ValueError(
                "eval_samples > 0 samples several answers per problem, but the rollout's temperature is 0 (greedy), "
                "so they would all be the same; set rollout.init_args.temperature > 0 or eval_samples: 0"
            )
        if self.rollout.tools and self.executor is None:
            raise ValueError(
                "the rollout runs code (tools: true) but the recipe has no executor section; add one "
                "(e.g. executor: {class_path: LocalSandbox}) or set rollout.init_args.tools: false"
            )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = self.policy.load_tokenizer()
        self.model = self.policy.load_model()
        self.model.train()  # from_pretrained returns eval mode; dropout (if any) follows Lightning's mode
        self.on_policy_loaded()
        if self.rollout is not None:
            self.rollout.bind(self.model, self.tokenizer)
        shard = self._strategy_hook("shard_module")
        if shard is not None:  # FSDP2: each process keeps a share of every module's parameters
            for module in self.sharded_modules():
                shard(module)

    def sharded_modules(self) -> list[torch.nn.Module]:
        """The modules a sharding strategy splits among the processes: the trainable ones, and whatever frozen
        module a subclass scores with (a reference model). Each is sharded in :meth:`configure_model`."""
        return list(self.trainable_modules().values())

    def on_policy_loaded(self) -> None:  # optional hook
        """Called once the policy is loaded, before the rollout backend is bound to it (e.g. to copy it)."""

    def teardown(self, stage: str) -> None:
        # Executors hold processes or remote sandboxes, rewards may hold worker processes: free them however
        # the run ends (an in-process caller, a notebook or a test, lives on after fit and must not inherit them).
        # A caller that chains stages on one module (the CLI: validate, fit, validate) closes them itself at the
        # end, so that a backend with its own engine is not restarted from stale weights in between.
        if not self.keep_resources_open:
            self.close_resources()

    def close_resources(self) -> None:
        """Close the reward's, the executor's and the rollout backend's resources."""
        if self.reward is not None:
            self.reward.close()
        if self.executor is not None:
            run_sync(self.executor.aclose())
        if self.rollout is not None:
            run_sync(self.rollout.aclose())

    # ---- optimization ---------------------------------------------------------------------------------------

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The modules this algorithm trains, by name: the policy, and whatever a subclass adds (PPO's critic).

        Each gets an AdamW optimizer of its own (:meth:`configure_optimizers`, in this order) and its gradient
        norm is clipped on its own (:meth:`clip_grad_norm`); a module that is a submodule of this one is saved
        in its checkpoints.
        """
        assert self.model is not None
        return {"policy": self.model}

    def learning_rate(self, name: str) -> float:
        """The learning rate of the trainable module ``name`` (the policy's is ``lr``)."""
        return self.lr

    def configure_optimizers(self) -> Any:
        optimizers = [
            torch.optim.AdamW(
                [p for p in module.parameters() if p.requires_grad],
                lr=self.learning_rate(name),
                betas=self.betas,
                weight_decay=self.weight_decay,
            )
            for name, module in self.trainable_modules().items()
        ]
        return optimizers[0] if len(optimizers) == 1 else optimizers

    def optimizer_list(self) -> list[Any]:
        """The Lightning optimizers, one per trainable module, in :meth:`trainable_modules`' order."""
        optimizers = self.optimizers()
        return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    def clip_grad_norm(self, module: torch.nn.Module | None = None) -> float:
        """Clip ``module``'s gradient norm (default: the policy's) to ``max_grad_norm`` (if > 0); return the norm
        before clipping. Each trainable module is clipped on its own, so a critic's large early gradients
        never shrink the policy's step."""
        module = module if module is not None else self.model
        assert module is not None
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        limit = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        # Sharded gradients (FSDP2) are DTensors: the norm is then over every shard, and the same on every rank.
        return whole_norm(torch.nn.utils.clip_grad_norm_(params, limit))

    def clip_and_step(self, module: torch.nn.Module, optimizer: Any, last: bool = True) -> float:
        """Clip ``module``'s gradients (:meth:`clip_grad_norm`) and step its ``optimizer`` (:meth:`step_optimizer`);
        return the gradient norm before clipping. Under a strategy that clips inside its own step (DeepSpeed),
        the norm is the one it computed."""
        after_step = self._strategy_hook("grad_norm_after_step")
        norm = self.clip_grad_norm(module) if after_step is None else math.nan
        self.step_optimizer(optimizer, last=last)
        return after_step() if after_step is not None else norm

    def without_update(self) -> contextlib.AbstractContextManager[Any]:
        """A context whose optimizer steps count (``trainer.global_step``) but change nothing: the step of an RL
        step that has nothing to learn. Without gradients AdamW leaves the weights alone by itself; a strategy
        whose optimizer would move them anyway (DeepSpeed) holds them."""
        hook = self._strategy_hook("without_update")
        return hook() if hook is not None else contextlib.nullcontext()

    def step_optimizer(self, optimizer: Any, last: bool = True) -> None:
        """Step ``optimizer``; only the ``last`` step of a training step advances ``trainer.global_step``.

        One training step is one RL step however many optimizer steps its mini-batches (and its modules) take,
        as in verl, so ``trainer.max_steps`` counts RL steps.
        """
        if last:
            optimizer.step()  # through Lightning: advances global_step once per RL step
        else:
            # Same path as LightningOptimizer.step (strategy -> precision -> optimizer) minus the step count.
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def micro_batches(self, batch: PolicyBatch, index: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The rows ``index`` of ``batch`` (default: all, in order) split into forward/backward passes:
        ``micro_batch_size`` rows each, or, with ``max_tokens_per_micro_batch``, consecutive rows while their real
        tokens fit (a row longer than the budget is a pass of its own)."""
        index = torch.arange(batch.size) if index is None else index
        if self.max_tokens_per_micro_batch is None:
            return list(index.split(self.micro_batch_size))
        lengths = batch.attention_mask[index].sum(1).tolist()
        passes: list[list[int]] = []
        used = 0
        for row, length in zip(index.tolist(), lengths):
            if not passes or used + length > self.max_tokens_per_micro_batch:
                passes.append([])
                used = 0
            passes[-1].append(row)
            used += length
        return [torch.tensor(rows, dtype=torch.long) for rows in passes]

    def passes(
        self, batch: PolicyBatch | None, index: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor | None, PolicyBatch]]:
        """The forward/backward passes over the rows ``index`` of ``batch`` (:meth:`micro_batches`; ``batch``
        ``None``: this rank has no rows), each as (its rows, their tensors). Where passes are collectives
        (:attr:`lockstep_passes`) a rank with fewer passes than another (fewer rows, or shorter ones under a token
        budget) gets placeholder passes, (``None``, a row with nothing to learn), up to the most any rank has."""
        parts: list[tuple[torch.Tensor | None, PolicyBatch]] = (
            [(rows, batch.select(rows)) for rows in self.micro_batches(batch, index)] if batch is not None else []
        )
        if self.lockstep_passes:
            most = int(distributed.max_across({"passes": float(len(parts))})["passes"])
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            parts += [(None, PolicyBatch.placeholder(pad)) for _ in range(most - len(parts))]
        return parts

    def sequence_logprobs(
        self,
        model: torch.nn.Module,
        batch: PolicyBatch,
        with_entropy: bool = False,
        temperature: float | None = None,
        entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, R) log-probs of the response tokens (and entropies, zeros unless asked) under ``model``.

        Logits are divided by ``temperature``, by default the rollout's, so the trainer scores the
        distribution that sampled (supervised training passes 1).
        """
        if temperature is None:
            temperature = self.rollout.temperature if self.rollout is not None else 1.0
        if self.pack_sequences and supports_packing(model):
            return packed_logprobs(
                model, batch, temperature, with_entropy, entropy_grad, self.logprob_chunk_tokens, self.device
            )
        width = batch.response_width
        device = self.device
        input_ids = batch.input_ids.to(device)
        attention = batch.attention_mask.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=width + 1)
        logits = out.logits[:, :-1, :].float()
        if temperature > 0:
            logits = logits / temperature
        targets = input_ids[:, -width:]
        log_norm = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - log_norm
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                probs = torch.softmax(logits, dim=-1)
                entropy = log_norm - (probs * logits).sum(-1)
        else:
            entropy = torch.zeros_like(logprobs)
        return logprobs, entropy

    # ---- output ---------------------------------------------------------------------------------------------

    def record_step(
        self, metrics: dict[str, float], samples: Sequence[dict[str, Any]] = (), batch_size: int = 1
    ) -> StepRecord:
        """Log a training step's numbers and keep its record for the console and the run directory.

        Call it at the end of ``training_step``: the step table and ``metrics.jsonl`` read
        :attr:`last_step`. ``samples`` are rows for ``trajectories.jsonl``.
        """
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        # global_step is advanced by the step's last optimizer step, so it already counts this step.
        self.last_step = StepRecord(step=int(self.global_step), metrics=dict(metrics), samples=list(samples))
        return self.last_step

    def export(self, path: str | Path) -> Path:
        """Save the policy in Hugging Face format (loadable with ``AutoModelForCausalLM.from_pretrained``)."""
        assert self.model is not None
        path = Path(path)
        state = self.full_state_dict(rank_zero_only=True)  # gathers the shards: every rank calls export
        if self.global_rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(path, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
        return path
