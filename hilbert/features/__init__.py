"""Frozen-encoder features: encoder registry, content-addressed cache, Ray Data extraction."""
