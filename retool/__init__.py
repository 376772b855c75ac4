"""retool: train language models with reinforcement learning to reason with a code interpreter.

The public API. Everything here is re-exported from a private module and held stable by a test of
``__all__``; plugin authors subclass the base classes (``Executor``, ``RolloutBackend``, ``Reward``,
``Algorithm`` or ``PolicyGradient``, ``ProblemDataModule``) and exchange the dataclasses of :mod:`retool.types`.
"""

from retool.algorithm import Algorithm, PolicyBatch, PolicyGradient
from retool.answer import extract_boxed_answer, last_boxed
from retool.data import ProblemDataModule
from retool.executor import Executor
from retool.metrics import rollout_metrics
from retool.policy import BUILTIN_MODELS, Policy, PolicyLoadError
from retool.reward import Reward
from retool.rollout import (
    Generation,
    GenerationRequest,
    ReToolFormat,
    RolloutBackend,
    RolloutResult,
    TextOnlyFormat,
    ToolFormat,
)
from retool.types import (
    CheckResult,
    EvalRecord,
    ExecutionResult,
    Problem,
    RewardOutput,
    StepRecord,
    ToolCall,
    Trace,
    Trajectory,
)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
    "Algorithm",
    "CheckResult",
    "EvalRecord",
    "ExecutionResult",
    "Executor",
    "Generation",
    "GenerationRequest",
    "Policy",
    "PolicyBatch",
    "PolicyGradient",
    "PolicyLoadError",
    "Problem",
    "ProblemDataModule",
    "ReToolFormat",
    "Reward",
    "RewardOutput",
    "RolloutBackend",
    "RolloutResult",
    "StepRecord",
    "TextOnlyFormat",
    "ToolCall",
    "ToolFormat",
    "Trace",
    "Trajectory",
    "__version__",
    "extract_boxed_answer",
    "last_boxed",
    "rollout_metrics",
]
