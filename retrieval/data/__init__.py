"""Manifests, datasets, transforms, samplers and the data module."""
