"""The HILBERT model: cross-modal attention, self-attentive pooling and mixture-of-experts heads."""

from hilbert.model.hilbert import HilbertEmbeddings, HilbertModel, HilbertModelConfig, HilbertOutput

__all__ = ["HilbertEmbeddings", "HilbertModel", "HilbertModelConfig", "HilbertOutput"]
