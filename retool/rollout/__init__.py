"""Rollouts: the backend contract, the tool-interleaving loop and the text format."""

from retool.rollout.backend import Generation, GenerationRequest, RolloutBackend, RolloutResult
from retool.rollout.format import ReToolFormat, TextOnlyFormat, ToolFormat
from retool.rollout.loop import prompt_token_ids, rollout_groups, run_trajectory, trace_trajectory

__all__ = [
    "Generation",
    "GenerationRequest",
    "ReToolFormat",
    "RolloutBackend",
    "RolloutResult",
    "TextOnlyFormat",
    "ToolFormat",
    "prompt_token_ids",
    "rollout_groups",
    "run_trajectory",
    "trace_trajectory",
]
