"""Backbones, pooling, heads and the Embedder."""

from retrieval.models.backbone import Backbone, create_backbone
from retrieval.models.embedder import Embedder
from retrieval.models.weights import WeightsUnavailableError

__all__ = ["Backbone", "Embedder", "WeightsUnavailableError", "create_backbone"]
