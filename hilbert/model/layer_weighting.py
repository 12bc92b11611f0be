"""A learned softmax-weighted sum over a frozen encoder's hidden states (the SUPERB / s3prl
``Featurizer``): ``x = sum_l softmax(w)_l * h_l`` with one trainable logit per layer.

The logits start at 0, so an untrained model reads the plain average of the layers (what
``layer=avg`` caches) and training moves the weight to the layers that serve the task. The
encoder itself stays frozen and outside the model: its layers arrive as cached features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerWeighting(nn.Module):
    """``[..., layers, dim]`` -> ``[..., dim]``: the softmax(``logits``)-weighted sum over layers."""

    def __init__(self, layers: int):
        super().__init__()
        assert layers >= 2, "one layer needs no weighting"
        self.logits = nn.Parameter(torch.zeros(layers))

    def weights(self) -> Tensor:
        """``[layers]``, non-negative, summing to 1."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.einsum("...ld,l->...d", hidden_states, self.weights().to(hidden_states.dtype))
