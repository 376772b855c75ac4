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
from retool.algorithm.evaluation import Evaluation
from retool.executor import Executor
from retool.policy import Policy
from retool.reward import Reward
from retool.rollout.backend import RolloutBackend
from retool.strategies import whole_norm
from retool.tables import STEP_COLUMNS
from retool.types import EvalRecord, StepRecord


class Algorithm(Evaluation, L.LightningModule):
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

    # ---- processes ------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self._averages_gradients = isinstance(self.trainer.strategy.model, DistributedDataParallel)

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if not self._averages_gradients:
            return super().manual_backward(loss, *args, **kwargs)
        # DDP's reducer averages gradients during a backward pass and needs every rank to run the same passes
        # over the same parameters. An RL step does not: a rank may have nothing to learn from, a critic trains
        # alone during its warm-up, policy and critic take different micro-batches. So every pass runs without
        # the reducer, and sync_gradients averages each module once per optimizer step.
        with self.trainer.strategy.model.no_sync():
            return super().manual_backward(loss, *args, **kwargs)

    def _strategy_hook(self, name: str) -> Any:
        """The running strategy's ``name`` (see :mod:`retool.strategies`), or ``None`` when it has none (one
        process, DDP) or the module runs without a trainer."""
        trainer = self._trainer
        return getattr(trainer.strategy, name, None) if trainer is not None else None

    @property
    def lockstep_passes(self) -> bool:
        """Whether every forward or backward pass of a trained module is a collective (FSDP2, DeepSpeed), which
        every rank must run as many times as the others: a rank with nothing of its own to learn from then runs
        passes that teach nothing. (DDP's are not: retool averages its gradients once per optimizer step.)"""
        return self._strategy_hook("shard_module") is not None and distributed.world_size() > 1

    @property
    def shards_parameters(self) -> bool:
        """Whether each process holds only a share of the weights (FSDP2, ZeRO-3): they can only be gathered
        with every rank taking part."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        shards = getattr(strategy, "shards_parameters", hasattr(strategy, "shard_module"))
        return bool(shards) and distributed.world_size() > 1

    def full_weights(self, module: torch.nn.Module | None = None) -> contextlib.AbstractContextManager[Any]:
        """A context in which ``module`` (default: the policy) holds its whole parameters, so a rollout can
        decode with it, each rank for as many steps as its own trajectories need. Every rank must enter it
        together; with a strategy that does not shard, it does nothing."""
        module = module if module is not None else self.model
        hook = self._strategy_hook("full_weights")
        return hook(module) if hook is not None else contextlib.nullcontext(module)

    def full_state_dict(self, module: torch.nn.Module | None = None, rank_zero_only: bool = False) -> dict[str, Any]:
        """``module``'s (default: the policy's) state dict with every tensor whole (gathered from the shards
        under a sharding strategy; every rank must call it then). With ``rank_zero_only`` the other ranks may
        get an empty dict."""
        module = module if module is not None else self.model
        assert module is not None
        hook = self._strategy_hook("full_state_dict")
        return hook(module, rank_zero_only=rank_zero_only) if hook is not None else module.state_dict()

    def gradient_sync(self, module: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        """A context for one backward pass of ``module``: under a sharding strategy, gradients are reduced
        among the processes only if ``enabled`` (the optimizer step's last micro-batch of that module)."""
        hook = self._strategy_hook("gradient_sync")
        return hook(module, enabled) if hook is not None else contextlib.nullcontext()

    def sync_gradients(self, module: torch.nn.Module) -> None:
        """Make ``module``'s gradients the mean over the ranks, before clipping and the optimizer step.

        Under DDP (replicated weights) retool averages them itself (see :meth:`manual_backward`); on one process
        there is nothing to do.
        """
        if self._averages_gradients:
            distributed.average_gradients(module.parameters())

    def token_normalizer(self, local_tokens: torch.Tensor | float) -> torch.Tensor:
        """What a loss summed over this rank's tokens is divided by, so that the gradient averaged over the
        ranks is the per-token mean over every rank's tokens: a run on N processes takes the step a run on one
        takes over the same global batch. The tokens of all ranks, over N (at least 1)."""
        total = distributed.sum_across({"tokens": float(local_tokens)})["tokens"]
        return torch.tensor(max(total, 1.0) / distributed.world_size(), dtype=torch.float32)

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
        width = batch.response_width
        device = self.device
        input_ids = batch.input_ids.to(device)
        attention = batch.attention_mask.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=width + 1)
        logits = out.logits[:, :-1, :].float()
        if temperature is None:
            temperature = self.rollout.temperature if self.rollout is not None else 1.0
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

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of modules that are rebuilt from the recipe rather than saved (a frozen reference
        model): left out of checkpoints, and taken from the rebuilt module when one is loaded."""
        return ()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_prefixes()
        if frozen:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(frozen)]:
                del state[key]
        # Every random stream the run draws from outside its own seeded generators (see extra_state).
        checkpoint["retool"] = {"rng": _rng_states(), **self.extra_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_prefixes()
        if frozen:  # the rebuilt modules' weights, so that loading stays strict for everything else
            state = checkpoint["state_dict"]
            state.update({k: v for k, v in self.state_dict().items() if k.startswith(frozen)})
        saved = checkpoint.get("retool")
        if saved is not None:
            _set_rng_states(saved["rng"])
            self.load_extra_state(saved)

    def extra_state(self) -> dict[str, Any]:
        """What a subclass adds to a checkpoint beyond its modules' weights and optimizers (its own generators)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

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


def _rng_states() -> dict[str, Any]:
    """The global random streams, in types a checkpoint loaded with ``weights_only`` accepts (no NumPy arrays)."""
    import random

    import numpy as np

    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
