"""Data layer: the manifest contract, audio decoding and the synthetic demo corpus."""
