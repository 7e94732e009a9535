"""Backbones, pooling, heads and the Embedder."""

from retrieval.models.backbone import Backbone, Preprocessing, create_backbone
from retrieval.models.embedder import Embedder
from retrieval.models.weights import WeightsUnavailableError

__all__ = ["Backbone", "Embedder", "Preprocessing", "WeightsUnavailableError", "create_backbone"]
