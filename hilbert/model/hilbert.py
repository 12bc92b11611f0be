"""The HILBERT document model (arXiv 2604.16247): segment features in, document embeddings and
per-task logits out.

    audio [B,S,Da] -> LayerNorm, Linear -> + position -> audio self-attention -+-> pool_a -> z_a
    text  [B,S,Dt] -> LayerNorm, Linear -> + position -> text self-attention  -+-> pool_t -> z_t
                                                                               |
                         cross-modal layers (audio <-> text) <-----------------+
                         -> [audio' + m_a ; text' + m_t] -> pool_j -> z_j
    [z_a; z_t; z_j] -> mixture of experts -> logits per task, gate probabilities, load balance

With ``streams="shared"`` (an ablation) there are no self-attention layers, and ``pool_a`` and
``pool_t`` read the cross-modal layers' output, like ``pool_j``.

Choices the paper leaves open, and why:

* Modality-specific embeddings (``streams="separate"``, the default): ``z_a`` is a function of
  the audio segments only and ``z_t`` of the text only: each modality's segments run through
  its own ``n_self_layers`` masked self-attention layers and its own pooling, before the
  modalities meet. The dual contrastive and CKA terms align each of them with the joint
  embedding; were ``z_a`` pooled after cross-attention, it could satisfy them by copying the
  text it has read, and the balance term would compare two mixed views. The cross-modal layers
  start from the self-attended streams, so the joint embedding builds on both modality encoders
  (which therefore also learn from the joint terms; their outputs still see one modality).
  ``streams="shared"`` pools all three after cross-attention, so the difference is measured.
* Positions: sine/cosine codes of the absolute segment index, the same code added to the audio
  and the text of a segment. Interview documents run to hundreds of segments and their lengths
  vary widely; fixed codes need no ``max_segments`` and never meet an untrained row, and because
  an audio segment and its text share one code, cross-attention can find the aligned segment
  from the code alone. A fraction-of-document position would blur "the first question" across
  documents of different lengths, which is a signal we want to keep.
* Joint ("cross-attentive") embedding: the two cross-attended sequences are concatenated along
  the segment axis, each tagged with a learned modality embedding, and one self-attentive
  pooling runs over all ``2S`` positions. Its weights ``[B, heads, 2, S]`` say which stream and
  which segments the joint embedding reads. After cross-attention each stream also carries the
  other modality, so they show where the joint embedding looks, not where its information came
  from; ``hilbert.losses.information_balance`` estimates that from the modality-specific
  embeddings. (A per-segment gated fusion would mix audio and text inside each segment before
  pooling, so the weights could not even say which stream carried the document.)
* Several encoder layers (an encoder's ``layer=all``; ``audio_layers``/``text_layers`` > 1):
  the projection standardises each layer's features on their own, sums the layers with learned
  softmax weights (``hilbert.model.layer_weighting``, initialised to the plain average) and
  appends the segment timing columns after the sum, unweighted: timing is one value per segment,
  not per layer. ``layer_weights()`` reports the weights.
* Unimodal ablations (``modality="audio"`` or ``"text"``): the missing embedding is ``None``;
  the one stream runs through its self-attention layers (pooled into ``z_x``) and then through
  the same number of cross-modal layers as self-attention, and ``z_j`` is the joint pooling over
  that one tagged stream: a second, deeper pooled view, so the classifier input is ``[z_x; z_j]``
  and the model keeps the size of its one-modality half. (With ``streams="shared"`` both pool
  the output of the cross-modal layers.) The cross-modal objectives need both
  streams, so ``hilbert.losses.hilbert_loss`` leaves them out for these runs (task and
  load-balance terms only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hilbert.model.attention import (
    CrossModalEncoder,
    SegmentProjection,
    SelfAttentionEncoder,
    SelfAttentivePooling,
    sinusoidal_positions,
)
from hilbert.model.moe import LOAD_BALANCE, LinearClassifier, MixtureOfExpertsClassifier

MODALITIES = {"both": ("audio", "text"), "audio": ("audio",), "text": ("text",)}
HEADS = ("moe", "linear")
STREAMS = ("separate", "shared")

# A saved config (checkpoint.json) that lacks one of these fields was written before the field
# existed and was trained with this value, not today's default: such weights are the
# shared-stream model (they have no self-attention layers).
OLDER_CONFIG_VALUES = {"streams": "shared"}


@dataclass
class HilbertModelConfig:
    audio_dim: int  # width of the frozen speech encoder's segment features
    text_dim: int  # width of the frozen text encoder's segment features
    tasks: dict[str, int]  # label task -> number of classes
    d_model: int = 256
    d_embed: int = 256
    n_heads: int = 4
    n_self_layers: int = 1  # each modality's own self-attention layers (streams="separate" only)
    n_cross_layers: int = 2
    pooling_heads: int = 4
    dropout: float = 0.1
    n_experts: int = 4
    expert_hidden: int = 256
    head: str = "moe"  # "moe" | "linear"
    modality: str = "both"  # "both" | "audio" | "text"
    moe_balance: str = "switch"  # "switch" | "cv2": see hilbert.model.moe
    streams: str = "separate"  # "separate": z_a, z_t see only their modality | "shared": pooled after cross-attention
    # An encoder's layer=all: its features are audio_layers hidden states of audio_layer_dim side
    # by side (then any timing columns), summed with learned weights. 1 (and None): one vector,
    # as in every model before layer=all existed.
    audio_layers: int = 1
    audio_layer_dim: int | None = None
    text_layers: int = 1
    text_layer_dim: int | None = None

    def __post_init__(self):
        positive = (
            "audio_dim", "text_dim", "d_model", "d_embed", "n_heads", "pooling_heads", "n_experts", "expert_hidden"
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"HilbertModelConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("n_self_layers", "n_cross_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"HilbertModelConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"HilbertModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HilbertModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self._check_choice("head", HEADS)
        self._check_choice("modality", tuple(MODALITIES))
        self._check_choice("moe_balance", tuple(LOAD_BALANCE))
        self._check_choice("streams", STREAMS)
        self._check_tasks()
        for modality in ("audio", "text"):
            self._check_layers(modality)

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES[self.modality]

    def _check_choice(self, name: str, choices: tuple[str, ...]):
        if getattr(self, name) not in choices:
            raise ValueError(f"HilbertModelConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")

    def _check_layers(self, modality: str):
        layers, layer_dim, dim = (getattr(self, f"{modality}_{name}") for name in ("layers", "layer_dim", "dim"))
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"HilbertModelConfig.{modality}_layers must be a positive integer, got {layers!r}")
        if layers > 1 and not (isinstance(layer_dim, int) and layer_dim >= 1 and layers * layer_dim <= dim):
            raise ValueError(
                f"HilbertModelConfig.{modality}_layer_dim={layer_dim!r} must be a positive integer with "
                f"{modality}_layers * {modality}_layer_dim <= {modality}_dim ({layers} x {layer_dim} vs {dim})"
            )

    def _check_tasks(self):
        if not self.tasks:
            raise ValueError("HilbertModelConfig.tasks is empty: give at least one label task, e.g. {'diagnosis': 2}")
        for task, n_classes in self.tasks.items():
            if not isinstance(task, str) or not task or "." in task:
                raise ValueError(f"HilbertModelConfig.tasks: task name {task!r} must be a non-empty string without '.'")
            if not isinstance(n_classes, int) or n_classes < 2:
                raise ValueError(
                    f"HilbertModelConfig.tasks[{task!r}] must be an integer >= 2 classes, got {n_classes!r}"
                )


@dataclass
class HilbertEmbeddings:
    """Document embeddings and the pooling weights that made them.

    ``*_pooling`` are ``[B, pooling_heads, S]``; ``joint_pooling`` is
    ``[B, pooling_heads, n_modalities, S]`` with the modality axis in the order audio, text (or
    just the one stream in a unimodal model): the cross-attended streams the joint embedding
    reads. Weights are 0 on padded segments.
    """

    audio_embedding: Tensor | None  # [B, d_embed]
    text_embedding: Tensor | None  # [B, d_embed]
    joint_embedding: Tensor  # [B, d_embed]
    audio_pooling: Tensor | None
    text_pooling: Tensor | None
    joint_pooling: Tensor


@dataclass
class HilbertOutput(HilbertEmbeddings):
    logits: dict[str, Tensor] = field(default_factory=dict)  # task -> [B, n_classes]
    gate_probs: Tensor | None = None  # [B, n_experts]; None with the linear head
    load_balance_loss: Tensor | None = None  # scalar; 0 with the linear head


class HilbertModel(nn.Module):
    def __init__(self, config: HilbertModelConfig):
        super().__init__()
        self.config = config
        modalities = config.modalities
        self.projections = nn.ModuleDict({
            m: SegmentProjection(getattr(config, f"{m}_dim"), config.d_model, config.dropout,
                                 getattr(config, f"{m}_layers"), getattr(config, f"{m}_layer_dim"))
            for m in modalities
        })
        # empty for "shared", so its state dict is the earlier design's and old checkpoints load
        self.self_encoders = nn.ModuleDict(
            {m: SelfAttentionEncoder(config.d_model, config.n_heads, config.n_self_layers, config.dropout)
             for m in modalities if config.streams == "separate"}
        )
        self.encoder = CrossModalEncoder(
            modalities, config.d_model, config.n_heads, config.n_cross_layers, config.dropout
        )
        self.poolings = nn.ModuleDict({m: self._pooling() for m in modalities})
        self.modality_embedding = nn.Parameter(torch.randn(len(modalities), config.d_model) * 0.02)
        self.joint_pooling = self._pooling()
        classifier_in = (len(modalities) + 1) * config.d_embed
        if config.head == "moe":
            self.classifier = MixtureOfExpertsClassifier(
                classifier_in, config.tasks, config.n_experts, config.expert_hidden, config.dropout, config.moe_balance
            )
        else:
            self.classifier = LinearClassifier(classifier_in, config.tasks)

    def forward(self, audio: Tensor | None, text: Tensor | None, mask: Tensor) -> HilbertOutput:
        """``audio`` ``[B, S, audio_dim]``, ``text`` ``[B, S, text_dim]`` (segment-aligned; the
        stream a unimodal model does not use may be None), ``mask`` ``[B, S]`` bool, True on
        real segments."""
        embeddings = self.embed(audio, text, mask)
        present = [e for e in (embeddings.audio_embedding, embeddings.text_embedding) if e is not None]
        classified = self.classifier(torch.cat([*present, embeddings.joint_embedding], dim=-1))
        return HilbertOutput(
            **vars(embeddings),
            logits=classified.logits,
            gate_probs=classified.gate_probs,
            load_balance_loss=classified.load_balance_loss,
        )

    def embed(self, audio: Tensor | None, text: Tensor | None, mask: Tensor) -> HilbertEmbeddings:
        """Document embeddings without the classifier (for retrieval, probing and plots)."""
        streams = self._project(audio, text, mask)
        if self.config.streams == "separate":
            streams = {m: encoder(streams[m], mask) for m, encoder in self.self_encoders.items()}
        crossed = self.encoder(streams, mask)
        # "separate": each modality's embedding pools its own stream, before the modalities meet
        modality_states = streams if self.config.streams == "separate" else crossed
        pooled = {m: pool(modality_states[m], mask) for m, pool in self.poolings.items()}
        joint_embedding, joint_pooling = self._pool_joint(crossed, mask)
        return HilbertEmbeddings(
            audio_embedding=pooled["audio"][0] if "audio" in pooled else None,
            text_embedding=pooled["text"][0] if "text" in pooled else None,
            joint_embedding=joint_embedding,
            audio_pooling=pooled["audio"][1] if "audio" in pooled else None,
            text_pooling=pooled["text"][1] if "text" in pooled else None,
            joint_pooling=joint_pooling,
        )

    def set_feature_statistics(self, modality: str, mean: Tensor, std: Tensor) -> None:
        """Per-feature mean and standard deviation of ``modality``'s training segments."""
        if modality in self.projections:
            self.projections[modality].set_feature_statistics(mean, std)

    @torch.no_grad()
    def layer_weights(self) -> dict[str, Tensor]:
        """modality -> ``[layers]`` learned weights over its encoder's hidden states (summing to
        1), for the modalities whose features hold several layers."""
        return {m: projection.layer_weighting.weights() for m, projection in self.projections.items()
                if projection.layer_weighting is not None}

    def _project(self, audio: Tensor | None, text: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
        inputs = {"audio": audio, "text": text}
        self._check_inputs(inputs, mask)
        positions = sinusoidal_positions(mask.shape[1], self.config.d_model, device=mask.device)
        streams = {}
        for modality, projection in self.projections.items():
            # padded rows may hold anything (even NaN from a cache); zero them so they stay finite
            features = inputs[modality].masked_fill(~mask[..., None], 0.0)
            projected = projection(features)
            streams[modality] = projected + positions.to(projected.dtype)
        return streams

    def _pool_joint(self, streams: dict[str, Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        tagged = [streams[m] + self.modality_embedding[i].to(streams[m].dtype) for i, m in enumerate(self.poolings)]
        n_modalities = len(tagged)
        embedding, weights = self.joint_pooling(torch.cat(tagged, dim=1), mask.repeat(1, n_modalities))
        batch, heads, _ = weights.shape
        return embedding, weights.view(batch, heads, n_modalities, mask.shape[1])

    def _pooling(self) -> SelfAttentivePooling:
        c = self.config
        return SelfAttentivePooling(c.d_model, c.pooling_heads, c.d_embed, c.dropout)

    def _check_inputs(self, inputs: dict[str, Tensor | None], mask: Tensor):
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a bool tensor [batch, segments], got {mask.dtype} {tuple(mask.shape)}")
        expected = {"audio": self.config.audio_dim, "text": self.config.text_dim}
        for modality in self.projections:
            features = inputs[modality]
            if features is None:
                raise ValueError(f"HilbertModel(modality={self.config.modality!r}) needs {modality} features, got None")
            if features.shape != (*mask.shape, expected[modality]):
                raise ValueError(
                    f"{modality} features have shape {tuple(features.shape)}; expected "
                    f"[batch, segments, {modality}_dim] = {(*mask.shape, expected[modality])} to match the mask"
                )
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"documents at batch positions {empty} have no segments (mask all False); drop them")
