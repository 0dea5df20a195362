"""What training minimises: next-token cross-entropy on answer tokens, from cached MERT features.

Kept apart from the loop (:mod:`training.recipes.recipe`) so that tests and the demo model can
compute the very same loss without building a recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.recipes.data import IGNORE_INDEX
from training.reference.model import MullamaModel


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labelled positions, and their count.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled :data:`IGNORE_INDEX` carry no loss.
    """
    vocab = logits.shape[-1]
    target = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), target, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (target != IGNORE_INDEX).sum()


class TrainForward(nn.Module):
    """Cached MERT state means + tokens -> answer loss; the module DistributedDataParallel wraps.

    Holds the adapter, the prefix queries and LLaMA of a :class:`MullamaModel` (not MERT: features
    are cached), and computes exactly what :meth:`MullamaModel.music_query`,
    :meth:`MullamaModel.adapter_tokens` and :meth:`MullamaModel.logits` compute, batched.
    """

    def __init__(self, model: MullamaModel) -> None:
        super().__init__()
        self.adapter = model.adapter
        self.prefix_query = model.prefix_query
        self.llama = model.llama
        self.inject_layers = list(model.inject_layers)
        self.query_len = model.config.injection.query_len

    def forward(self, state_means: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor):
        a = self.adapter(state_means.float())
        prefix = self.prefix_query.weight.view(len(self.inject_layers), self.query_len, -1)
        adapters = {l: prefix[i][None] + a[:, None, :] for i, l in enumerate(self.inject_layers)}
        return answer_loss(self.llama(tokens, adapters=adapters), labels)
