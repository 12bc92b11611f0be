"""Which hidden states a transformer encoder contributes, and their mean over valid positions
(or, for CLS pooling, the first valid position)."""

from __future__ import annotations

from typing import Any

import torch

from hilbert.features.encoders.spec import EncoderSpec, EncoderSpecError


def resolve_layer(spec: EncoderSpec, layer: int | str, hidden_state_count: int) -> int | str:
    """``layer`` with a negative index turned positive (so ``-1`` and ``n-1`` fingerprint alike);
    an out-of-range index raises."""
    if isinstance(layer, str):
        return layer
    if not -hidden_state_count <= layer < hidden_state_count:
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: layer={layer} is out of range; this model has {hidden_state_count} hidden "
            f"states (0 = embeddings, {hidden_state_count - 1} = last layer), so use {-hidden_state_count}.."
            f"{hidden_state_count - 1}, 'last', 'avg' or 'all'"
        )
    return layer % hidden_state_count


def layers_kept(layer: int | str, hidden_state_count: int) -> int:
    """How many hidden states each vector holds: all of them for ``all``, else one."""
    return hidden_state_count if layer == "all" else 1


def wants_hidden_states(layer: int | str) -> bool:
    return layer != "last"


def select_layer(outputs: Any, layer: int | str) -> torch.Tensor:
    """``[batch, time, dim]`` float32: the final output (``last``), one hidden state (an index, 0 =
    embeddings), or the mean of all hidden states (``avg``); for ``all``, ``[batch, time,
    layers * dim]``: every hidden state side by side, layer 0 (the embeddings) first, so pooling
    over time pools each layer on its own and a segment's vector reshapes to ``[layers, dim]``."""
    if layer == "last":
        return outputs.last_hidden_state.float()
    if layer == "all":
        return torch.cat([state.float() for state in outputs.hidden_states], dim=-1)
    if layer == "avg":
        total = outputs.hidden_states[0].float()
        for state in outputs.hidden_states[1:]:
            total = total + state.float()
        return total / len(outputs.hidden_states)
    return outputs.hidden_states[layer].float()


def masked_sums(frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over time of ``frames [batch, time, dim]`` where ``mask [batch, time]`` is set, and how
    many positions that was. Returning both lets callers pool across chunks by frame count."""
    # In float32 even under fp16 autocast: a sum over thousands of frames can overflow float16.
    with torch.autocast(device_type=frames.device.type, enabled=False):
        mask = mask.to(torch.float32)
        return torch.einsum("btd,bt->bd", frames.float(), mask), mask.sum(dim=1)


def first_valid(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch, dim]`` float32: each row's first position where ``mask [batch, time]`` is set (the
    [CLS] token, on whichever side the tokenizer pads)."""
    first = mask.to(torch.int64).argmax(dim=1)
    return frames[torch.arange(frames.shape[0], device=frames.device), first].float()


def length_mask(lengths: torch.Tensor, time: int) -> torch.Tensor:
    """``[batch, time]``, true for the first ``lengths[i]`` positions of row ``i``."""
    assert int(lengths.max()) <= time, f"valid length {int(lengths.max())} exceeds the {time} frames computed"
    return torch.arange(time, device=lengths.device)[None, :] < lengths[:, None]
