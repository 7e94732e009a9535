"""A damaged embedding cache is logged in one line and recomputed, never a crash; a damaged
embeddings file given to evaluate.py is one ValueError naming it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from retrieval.evaluation.npz import read_embeddings_npz, write_embeddings_npz
from retrieval.tasks.embedding import embed_dataset


class Pictures(torch.utils.data.Dataset):
    """Six constant 3x4x4 images, as ImageDataset items."""

    transform = None

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, object]:
        return {
            "image": torch.full((3, 4, 4), float(i)),
            "label": i % 2,
            "index": i,
            "is_query": True,
            "is_gallery": True,
        }


class Counting(nn.Module):
    """Mean colour and a constant, counting the batches it embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        mean = images.mean(dim=(1, 2, 3))[:, None] * self.scale
        return torch.cat([mean, torch.ones_like(mean)], dim=1)


def embed(cache_dir: Path, model: Counting) -> tuple[np.ndarray, Path]:
    inference = {"runtime": "eager", "precision": "fp32", "use_cache": True}
    cfg = OmegaConf.create({"inference": {**inference, "cache_dir": str(cache_dir)}})
    out, cache = embed_dataset(
        cfg, model, Pictures(), {"what": "pictures"}, 4, 0, torch.device("cpu")
    )
    assert cache is not None
    return out.vectors, cache


@pytest.mark.parametrize("keep", [0.5, 0.98, 0.0])
def test_a_truncated_cache_is_logged_in_one_line_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: float
) -> None:
    model = Counting()
    first, cache = embed(tmp_path, model)
    data = cache.read_bytes()
    cache.write_bytes(data[: int(len(data) * keep)])
    calls = model.calls
    with caplog.at_level(logging.WARNING, logger="retrieval.tasks.embedding"):
        again, _ = embed(tmp_path, model)
    np.testing.assert_array_equal(again, first)
    assert model.calls > calls  # embedded again
    (record,) = [r for r in caplog.records if str(cache) in r.getMessage()]
    assert "damaged" in record.getMessage() and "\n" not in record.getMessage()
    assert cache.read_bytes() == data  # written again whole
    calls = model.calls
    embed(tmp_path, model)
    assert model.calls == calls  # and read from the cache next time


def test_a_truncated_embeddings_file_is_one_value_error(tmp_path: Path) -> None:
    path = tmp_path / "emb.npz"
    write_embeddings_npz(path, embeddings=np.eye(4, dtype=np.float32), labels=np.arange(4))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"emb\.npz is not a readable \.npz file"):
        read_embeddings_npz(path)
