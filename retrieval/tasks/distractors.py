"""``+distractors=r1m`` (``conf/distractors/``): the distractor images of Revisited Oxford /
Paris embedded once per model into shards, through the sharded embedding of ``embed.py``
(:mod:`retrieval.index.shards`: resumable, a rerun embeds only the unfinished shards),
then handed to the scoring one shard at a time (:mod:`retrieval.evaluation.distractors`).

The shards of a model live in ``distractors.shards_dir/<name>-<key>/``, the key a digest of
the model's fingerprint (weights, TTA, preprocessing), the image list, the shard size and the
precision and runtime they were computed in: another model gets its own folder, and the same
command run again reads them back.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from retrieval.data.images import ImageLoadError
from retrieval.data.preprocessing import Preprocessing
from retrieval.datasets.gnd import distractor_images
from retrieval.evaluation import RetrievalResult
from retrieval.evaluation.distractors import check_distractor_steps
from retrieval.index.shards import ShardItem, ShardPlan, ShardSet, embed_shards
from retrieval.models import Embedder
from retrieval.models.extract import model_fingerprint
from retrieval.postprocess import Postprocess
from retrieval.tasks.embed import ShardEmbedder

__all__ = ["DISTRACTOR_LABEL", "Distractors", "EmbeddingRun", "distractors_of"]

log = logging.getLogger(__name__)

#: The label of a distractor in reports (it is relevant to no query).
DISTRACTOR_LABEL = "distractor"


@dataclass(frozen=True)
class EmbeddingRun:
    """How the gallery was embedded, which the distractors must match."""

    pre: Preprocessing
    device: torch.device
    batch_size: int
    num_workers: int
    precision: str
    runtime: str


@dataclass
class Distractors:
    """The distractors of one evaluation: their images (in list order) and, per embedder,
    the finished shards (:meth:`shards`)."""

    name: str
    source: str
    plan: ShardPlan
    shards_dir: Path
    embedded: dict[str, ShardSet] = field(default_factory=dict)
    last: ShardSet | None = None  # the shards :meth:`blocks` gave last

    def _folder(self, fingerprint: str, run: EmbeddingRun) -> Path:
        key = hashlib.sha256(
            "\0".join(
                [
                    fingerprint,
                    self.plan.digest(),
                    str(self.plan.shard_size),
                    run.precision,
                    run.device.type,
                    run.runtime,
                ]
            ).encode()
        ).hexdigest()
        return self.shards_dir / f"{self.name.lower()}-{key[:16]}"

    def shards(self, embedder: Embedder, runner: torch.nn.Module, run: EmbeddingRun) -> ShardSet:
        """The distractors embedded by ``embedder`` (run as ``runner``: the same model, maybe
        exported to another runtime), embedding the shards not yet finished.

        Raises:
            ValueError: a distractor cannot be read (one line naming it and the fix).
        """
        fingerprint = model_fingerprint(embedder, run.pre)
        if fingerprint in self.embedded:
            return self.embedded[fingerprint]
        folder = self._folder(fingerprint, run)
        dim = int(embedder.embedding_dim)
        header = {
            "dim": dim,
            "model_fingerprint": fingerprint,
            "preprocessing": run.pre.to_dict(),
            "source": self.source,
            "embedding": {
                "precision": run.precision,
                "device_type": run.device.type,
                "runtime": run.runtime,
            },
        }
        fix = f"extract it again from the {self.name} archives: every listed distractor counts"
        shard_embedder = ShardEmbedder(
            runner,
            dim,
            run.pre,
            run.device,
            run.batch_size,
            run.num_workers,
            run.precision,
            strict=True,
            fix=fix,
        )
        log.info("%s distractors: %d shards in %s", self.name, self.plan.num_shards, folder)
        try:
            done = embed_shards(folder, self.plan, header, shard_embedder)
        except ImageLoadError as err:
            raise ValueError(f"distractors {self.source}: {err}") from None
        log.info(
            "%s distractors: %d shards embedded, %d already finished",
            self.name,
            len(done["embedded"]),
            len(done["kept"]),
        )
        self.embedded[fingerprint] = ShardSet.open(folder)
        return self.embedded[fingerprint]

    def blocks(
        self, embedder: Embedder, runner: torch.nn.Module, run: EmbeddingRun
    ) -> Iterator[np.ndarray]:
        """The distractors' vectors by ``embedder``, one shard at a time (see :meth:`shards`),
        as :func:`retrieval.evaluation.listed.evaluate_revisited` reads them."""
        self.last = self.shards(embedder, runner, run)
        return self.last.shard_vectors()

    def with_neighbours(
        self, result: RetrievalResult, labels: np.ndarray, paths: np.ndarray
    ) -> tuple[RetrievalResult, np.ndarray, np.ndarray]:
        """``result`` (scored with the shards :meth:`blocks` gave last) and the gallery's
        ``labels`` and ``paths``, with the distractors among the first results appended to
        the gallery: ids ``ng, ng + 1, ...`` by ascending distractor number, so the report's
        pictures and tables show them."""
        ids, ng = result.neighbor_ids, len(labels)
        if ids is None or self.last is None or not (ids >= ng).any():
            return result, labels, paths
        rows, inverse = np.unique(ids[ids >= ng] - ng, return_inverse=True)
        moved = ids.copy()
        moved[ids >= ng] = ng + inverse.reshape(-1)
        items = self.last.items_at(rows.tolist())
        labels = np.concatenate([labels, [item.label or DISTRACTOR_LABEL for item in items]])
        paths = np.concatenate([paths, [item.uri for item in items]])
        return replace(result, neighbor_ids=moved), labels, paths

    def describe(self) -> dict[str, Any]:
        """What the report's protocol records about the distractors."""
        return {
            "name": self.name,
            "source": self.source,
            "images": len(self.plan.items),
            "shard_size": self.plan.shard_size,
            "shards": sorted(str(s.folder) for s in self.embedded.values()),
            "embedded": self.last.count if self.last is not None else 0,
        }


def distractors_of(
    cfg: DictConfig, protocol: str | None, steps: Postprocess | None = None
) -> Distractors | None:
    """The distractors ``cfg.distractors`` names (None when it names none), their images
    listed and checked, and the search-time ``steps`` checked, before anything is embedded.

    Raises:
        ValueError: distractors for a dataset that is not a revisited benchmark, steps they
            do not allow (DBA, αQE), or a distractor folder or list that is missing or wrong
            (one line naming the file and the fix).
    """
    node = cfg.get("distractors")
    if not node:
        return None
    if protocol != "revisited":
        raise ValueError(
            f"+distractors={str(node.name).lower()} adds distractors to the revisited "
            "benchmarks: use it with data=roxford5k or data=rparis6k, or drop it"
        )
    check_distractor_steps(steps)
    images = distractor_images(node.root, node.list_file)
    items = [ShardItem(str(p), DISTRACTOR_LABEL) for p in images]
    listing = f"{node.root}/{node.list_file}" if node.list_file else f"{node.root}/jpg"
    return Distractors(
        str(node.name), listing, ShardPlan(items, int(node.shard_size)), Path(node.shards_dir)
    )
