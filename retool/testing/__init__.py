"""A test kit for plugin authors: fakes to drive the core with, and the contracts every plugin kind must keep.

Fakes (``fakes.py``): :class:`ScriptedRollout` plays back a fixed response, honouring stops as a real backend
must; :class:`EchoExecutor` answers cells with a function of their code; :class:`InMemoryData` holds problems
and traces in lists. None of them runs model-written code.

Contracts, each a pytest-collectable class (subclass it, set ``factory``) and a function that checks every
rule at once and raises one ``AssertionError`` listing the broken ones:

* executors: :class:`ExecutorContract` / :func:`executor_contract` (``executor.py``);
* rewards: :class:`RewardContract` / :func:`reward_contract` (``reward.py``);
* rollout backends: :class:`RolloutContract` / :func:`rollout_contract` (``rollout.py``);
* datasets: :class:`DataContract` / :func:`data_contract` (``data.py``);
* every plugin's options: :func:`options_contract` (``options.py``).

retool's own built-ins are held to the same suites (``tests/contract/``).
"""

from retool.testing.data import DataContract, data_contract
from retool.testing.executor import ExecutorContract, executor_contract
from retool.testing.fakes import EchoExecutor, InMemoryData, ScriptedRollout
from retool.testing.options import options_contract
from retool.testing.reward import RewardContract, reward_contract
from retool.testing.rollout import RolloutContract, rollout_contract

__all__ = [
    "DataContract",
    "EchoExecutor",
    "ExecutorContract",
    "InMemoryData",
    "RewardContract",
    "RolloutContract",
    "ScriptedRollout",
    "data_contract",
    "executor_contract",
    "options_contract",
    "reward_contract",
    "rollout_contract",
]
