"""The bundle's model, in three modules re-exported here: :mod:`~retrieval.bundle.model_config`
(``model.json``: its schema and how the Embedder is rebuilt from it),
:mod:`~retrieval.bundle.model_export` (safetensors, TorchScript and ONNX files, each checked
against PyTorch) and :mod:`~retrieval.bundle.runtime` (ONNX Runtime, TorchScript or eager
PyTorch behind one ``Runtime``)."""

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
