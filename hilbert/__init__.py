"""HILBERT."""
