"""PPO's critic: a value head on the backbone of a causal language model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

HEAD_FILE = "value_head.safetensors"


def backbone_of(model: Any) -> torch.nn.Module:
    """The transformer under a Hugging Face causal LM's output layer (``model.model`` for Llama, Qwen, ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no backbone under base_model_prefix {prefix!r}")
    return backbone


class ValueModel(torch.nn.Module):
    """``V(prefix)`` at every position: a linear head on a transformer's last hidden state.

    Args:
        backbone: The transformer (a Hugging Face base model, e.g. ``LlamaModel``).
        hidden_size: Its hidden size.
    """

    def __init__(self, backbone: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        # A small head: the first values are near 0 (the returns' scale is the reward's, +-1), and the backbone
        # still gets gradient from the first step.
        torch.nn.init.normal_(self.head.weight, std=0.01 / hidden_size**0.5)
        torch.nn.init.zeros_(self.head.bias)
        dtype = next(backbone.parameters()).dtype
        self.head.to(dtype)

    @classmethod
    def from_policy(cls, policy: Any) -> ValueModel:
        """A critic whose backbone starts as a copy of the policy's (its output layer is not copied)."""
        backbone = copy.deepcopy(backbone_of(policy))
        return cls(backbone, policy.config.hidden_size)

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32") -> ValueModel:
        """A critic from a folder: one exported by :meth:`save` (backbone and head), or any causal LM, whose
        backbone is taken and given a fresh head."""
        from retool.policy import Policy

        folder = Path(name_or_path).expanduser()
        if (folder / HEAD_FILE).is_file():
            from safetensors.torch import load_file
            from transformers import AutoModel

            backbone = AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype) if dtype != "auto" else "auto")
            critic = cls(backbone, backbone.config.hidden_size)
            critic.head.load_state_dict(load_file(folder / HEAD_FILE))
            return critic
        model = Policy(name_or_path=name_or_path, dtype=dtype).load_model()
        return cls(backbone_of(model), model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
        """(n, width) values of the state before each of the last ``width`` tokens of each row.

        The same alignment as the policy's log-probabilities: the value at a response column is read from the
        hidden state of the token before it, so it estimates the return of the state in which that token was
        chosen.
        """
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        states = hidden.last_hidden_state[:, -(width + 1) : -1]
        return self.head(states).squeeze(-1).float()

    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Save the backbone in Hugging Face format and the head beside it; :meth:`load` reads the folder back.

        ``state_dict`` is this module's, whole (the default: its own; a sharded critic passes the gathered one).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head = {k.removeprefix("head."): v.detach().contiguous() for k, v in state.items() if k.startswith("head.")}
        self.backbone.save_pretrained(path, state_dict=backbone, safe_serialization=True)
        save_file(head, path / HEAD_FILE)
        return path
