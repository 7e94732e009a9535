"""Backbones, pooling, heads and the Embedder."""
