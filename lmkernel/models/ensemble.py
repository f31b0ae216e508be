"""An ensemble of encoder classifiers that share a tokenizer and labels, behind one model's interface.

    hidden  = [h_1 | h_2 | ... | h_k]                 each member's hidden states, side by side
    classify = log( (1/k) sum_i softmax(head_i(h_i)) )  so a softmax of it is the members' mean probability
    pool     = (1/k) sum_i pool_i(h_i)                  sentence embeddings: the members' mean

Made by `lmk ensemble RUN... -o DIR` (`train/ensemble.py`); `load_model(DIR)` builds it from the member
directories that DIR holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata


class EnsembleClassifier(nn.Module):
    """Several classifiers run on the same tokens; their probabilities averaged."""

    def __init__(self, config: ModelConfig, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(members)
        self.width = config.hidden_size

    @property
    def classifier(self) -> nn.Module:
        """The first member's head (every member has one; `classify` uses them all)."""
        return self.members[0].classifier

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([m(input_ids, positions, meta, token_type_ids) for m in self.members], dim=-1)

    def _parts(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return list(hidden.split(self.width, dim=-1))

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        probs = torch.stack([m.classify(h, meta).float().softmax(-1) for m, h in zip(self.members, self._parts(hidden))])
        return probs.mean(0).log()

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return torch.stack([m.pool(h, meta) for m, h in zip(self.members, self._parts(hidden))]).mean(0)
