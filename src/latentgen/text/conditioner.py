"""The conditioning-stage interface (tokenize + encode, original state dicts, strict loading) and the two
stages that take no text: class labels (`ClassEmbedder`) and unconditional models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from latentgen.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from .config import CondConfig


def _describe(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(
    expected: Mapping[str, tuple], sd: Mapping[str, torch.Tensor], what: str, name_prefix: str = "cond_stage_model."
) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys (one line)."""
    problems = []
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    misshaped = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if missing:
        problems.append("missing " + _describe(name_prefix + k for k in missing))
    if unexpected:
        problems.append("unexpected " + _describe(name_prefix + k for k in unexpected))
    if misshaped:
        problems.append(
            "mis-shaped "
            + ", ".join(
                f"{name_prefix}{k} {list(sd[k].shape)} (model wants {list(expected[k])})" for k in misshaped[:4]
            )
        )
    if problems:
        raise CheckpointError(
            f"cond stage weights do not fit the {what} encoder: {'; '.join(problems)}; "
            "use the checkpoint's own config or a matching checkpoint"
        )


class _Conditioner(nn.Module):
    """Uniform API of every τθ: ``tokenize`` → ``forward`` = ``encode``; original-layout state dicts."""

    kind: str

    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind

    @property
    def context_dim(self) -> int | None:
        return self.cfg.context_dim

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, prompts) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts_or_labels) -> torch.Tensor | None:
        """Context ``[B, L, D]`` for a list of prompts (or class labels)."""
        return self(self.tokenize(prompts_or_labels).to(self._device()))

    def unused_in_forward(self) -> list[nn.Parameter]:
        """Parameters the checkpoint holds but `forward` never uses (training leaves them out)."""
        return []

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights as our checkpoints store them under ``cond_stage_model.``."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_original_state_dict(self, sd: Mapping[str, torch.Tensor], name_prefix: str = "cond_stage_model."):
        """Strict load of a cond stage (keys without the prefix); ``name_prefix`` only labels error messages."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        check_state_dict(expected, sd, self.kind, name_prefix)
        self.load_state_dict(dict(sd), strict=True, assign=True)


class ClassEmbedder(_Conditioner):
    """CompVis ``ClassEmbedder``: label → ``embedding(label)[:, None]``, context [B, 1, D].

    ``null_label`` is the extra "unconditional" class used for classifier-free guidance (CompVis cin256-v2:
    label 1000 of 1001), or None when the model was trained without one.
    """

    def __init__(self, cfg: CondConfig):
        super().__init__(cfg)
        self.embedding = nn.Embedding(cfg.n_classes, cfg.embed_dim)

    @property
    def null_label(self) -> int | None:
        return self.cfg.null_label

    def tokenize(self, labels) -> torch.Tensor:
        """Class labels (ints, digit strings or a tensor) → LongTensor [B], range-checked."""
        try:
            ids = torch.as_tensor([int(x) for x in (labels.tolist() if torch.is_tensor(labels) else labels)])
        except (TypeError, ValueError):
            raise InputError(f"class labels must be integers 0..{self.cfg.n_classes - 1}; got {labels!r}") from None
        bad = [int(i) for i in ids if not 0 <= i < self.cfg.n_classes]
        if bad:
            raise InputError(f"class label {bad[0]} is outside 0..{self.cfg.n_classes - 1}; use a valid class index")
        return ids.long()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]


class NoConditioner(_Conditioner):
    """Unconditional models (``__is_unconditional__``): no weights, no context."""

    def tokenize(self, prompts) -> None:
        return None

    def forward(self, ids=None) -> None:
        return None

    def encode(self, prompts_or_labels=None) -> None:
        return None
