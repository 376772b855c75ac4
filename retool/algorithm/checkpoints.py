"""What an algorithm adds to a Lightning checkpoint so that a resumed run takes the uninterrupted run's steps.

A mixin of :class:`~retool.algorithm.Algorithm`: frozen modules left out (rebuilt from the recipe), every global
random stream, and what a subclass keeps of its own (:meth:`Checkpoints.extra_state`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class Checkpoints(L.LightningModule):
    """The checkpoint hooks of :class:`~retool.algorithm.Algorithm`."""

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
        # The rebuilt modules' weights, so that loading stays strict for everything else. (A sharded checkpoint's
        # weights are not in this dictionary: the strategy loaded them itself.)
        if frozen and "state_dict" in checkpoint:
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
