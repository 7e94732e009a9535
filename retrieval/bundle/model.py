"""The bundle's model: export an :class:`Embedder` to files and run it back without training code.

Files written by :func:`export_model`::

    model.json          how to rebuild the Embedder in plain Python (schema below)
    model.safetensors   the Embedder's state dict (contiguous float32 CPU tensors)
    model.ts            TorchScript (traced, eval mode, float32 CPU)
    model.onnx          ONNX: "images" (batch, 3, S, S) float32 -> "embeddings" (batch, D)

``model.json`` (checked by :func:`check_model_config`; unknown keys are errors)::

    {"backbone": {"name": "resnet50", "source": "timm", "kwargs": {}},
     "embedder": {"embedding_dim": 512, "pooling": "gem", "head_bn": false},
     "input_size": 224, "output_dim": 512}

``backbone``: ``name`` and ``source`` ("timm" | "torchvision", default "timm") and ``kwargs``
(JSON object, default {}) of :func:`retrieval.models.create_backbone` (weights never loaded);
``embedder``: :class:`Embedder` arguments, ``embedding_dim`` (int or null = backbone features)
and ``pooling`` required, ``head_bn`` default false; ``input_size`` (S) and ``output_dim`` (D)
are filled in by the export. Every runtime returns L2-normalised float32 rows.
"""

from retrieval.bundle.model_config import (
    MODEL_CONFIG,
    build_embedder,
    check_model_config,
    read_model_config,
)
from retrieval.bundle.model_export import export_model
from retrieval.bundle.runtime import Runtime, load_runtime

__all__ = [
    "MODEL_CONFIG",
    "Runtime",
    "build_embedder",
    "check_model_config",
    "export_model",
    "load_runtime",
    "read_model_config",
]
