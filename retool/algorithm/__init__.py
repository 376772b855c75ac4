"""Training algorithms: the base every algorithm shares and the RL step policy-gradient algorithms share.

* ``base.py``: :class:`Algorithm`, a LightningModule built from the recipe's components (policy, rollout,
  executor, reward) with the optimizer, log-probabilities, evaluation and export every algorithm uses.
* ``evaluation.py``: the validation hooks (greedy and sampled passes over held-out problems).
* ``policy_gradient.py``: :class:`PolicyGradient`, one RL step (rollout, reward, advantages, clipped updates
  over mini- and micro-batches); an estimator subclasses it with ``advantages`` and ``loss``.
* ``batch.py``: :class:`PolicyBatch`, trajectories as tensors.

An algorithm that trains on something other than rollouts (``SFT``) subclasses :class:`Algorithm` directly.
"""

from retool.algorithm.base import Algorithm
from retool.algorithm.batch import PolicyBatch
from retool.algorithm.policy_gradient import PolicyGradient

__all__ = ["Algorithm", "PolicyBatch", "PolicyGradient"]
