"""HILBERT: hierarchical, balanced document-level audio-text embeddings, trained and swept on Ray."""

__version__ = "0.1.0"
