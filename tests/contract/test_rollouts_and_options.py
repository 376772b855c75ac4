"""The built-in rollout backends held to the rollout contract, and every built-in plugin to the option contract."""

from __future__ import annotations

import pytest

from retool.plugins import KINDS, discover
from retool.testing import RolloutContract, options_contract
from retool_plugins.rollout.hf import HFRollout


@pytest.fixture(autouse=True)
def _policy(request: pytest.FixtureRequest) -> None:
    if request.cls is not None:  # a rollout suite: its backend's policy
        fixture = "tiny_vllm_model_dir" if request.cls is TestVLLMRollout else "tiny_model_dir"
        request.cls.policy = str(request.getfixturevalue(fixture))


class TestHFRollout(RolloutContract):
    factory = staticmethod(lambda: HFRollout(max_new_tokens=12, max_batch_size=3))


class TestHFRolloutWithTransformersKernels(RolloutContract):
    factory = staticmethod(lambda: HFRollout(max_new_tokens=12, fast_kernels=False))


def _vllm() -> object:
    pytest.importorskip("vllm", reason="vllm is not installed here: make test-vllm")
    from retool_plugins.rollout.vllm import VLLMRollout

    return VLLMRollout(max_new_tokens=12, gpu_memory_utilization=0.05, max_model_len=512)


@pytest.mark.vllm
class TestVLLMRollout(RolloutContract):
    factory = staticmethod(_vllm)


@pytest.mark.parametrize("plugin", discover(), ids=lambda p: p.name)
def test_every_option_of_a_plugin_and_its_bases_is_settable_and_documented(plugin) -> None:
    options_contract(plugin.cls, KINDS[plugin.kind])
