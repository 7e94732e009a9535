"""Hard-negative batches: each image's nearest neighbours, and the callback that hands them to
the instance sampler at each epoch's start."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.training.neighbour_batches import NeighbourBatches, nearest_neighbours
from tests.tasks.test_copydetect_experiment import tiny_copydetect


def _naive_neighbours(vectors: np.ndarray, k: int, cap: float) -> list[list[int]]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    out = []
    for i, row in enumerate(unit @ unit.T):
        order = sorted(
            (j for j in range(len(row)) if j != i and row[j] <= cap), key=lambda j: (-row[j], j)
        )
        out.append(order[:k])
    return out


def test_nearest_neighbours_match_a_naive_loop_with_ties_and_duplicates():
    rng = np.random.default_rng(0)
    vectors = rng.integers(-2, 3, (40, 3)).astype(np.float32)  # many exact duplicates and ties
    vectors[vectors.sum(axis=1) == 0] += 1  # no zero rows
    found = nearest_neighbours(vectors, 5, chunk=7)  # chunks that do not divide 40
    assert found.tolist() == _naive_neighbours(vectors, 5, 1.0 + 1e-6)


def test_nearest_neighbours_leave_out_likely_duplicates():
    vectors = np.array([[1, 0], [1, 0], [1, 0.2], [0.8, 0.6], [0, 1]], dtype=np.float32)
    found = nearest_neighbours(vectors, 2, max_similarity=0.999)
    assert found[0].tolist() == [2, 3]  # row 1 (the same vector) is no negative
    assert found.tolist() == [r[:2] for r in _naive_neighbours(vectors, 2, 0.999)]
    lonely = nearest_neighbours(np.array([[1, 0], [1, 0]], dtype=np.float32), 1, 0.5)
    assert lonely.tolist() == [[0], [1]]  # nothing left: its own index, which the sampler skips


def _instance_run(tmp_path, extra: list[str]):
    return tiny_copydetect(
        tmp_path,
        "sampler.batches_per_epoch=2",
        "trainer.precision=32",
        "+trainer.limit_val_batches=0",
        "+trainer.enable_progress_bar=false",
        *extra,
    )


@pytest.mark.filterwarnings("ignore:.*could not find the monitored key")
def test_the_callback_gives_the_sampler_the_models_neighbours_before_the_epoch(tmp_path, capsys):
    objects = _instance_run(
        tmp_path,
        [
            "callbacks=neighbour_batches",  # conf/callbacks/neighbour_batches.yaml
            "callbacks.neighbour_batches.neighbours=6",
        ],
    )
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    seen: list[list[int]] = []
    step = module.training_step

    def recording_step(batch, batch_idx):
        seen.append(batch["index"][::2].tolist())
        return step(batch, batch_idx)

    module.training_step = recording_step
    trainer.fit(module, datamodule=datamodule)
    sampler = trainer.train_dataloader.batch_sampler
    assert sampler.neighbours is not None and sampler.neighbours.shape == (40, 6)
    assert (sampler.neighbours != np.arange(40)[:, None]).all()
    assert len(seen) == 2
    for images in seen:  # two groups of 4: a leader and 3 of its 6 neighbours
        for start in (0, 4):
            leader, *mates = images[start : start + 4]
            assert set(mates) <= set(sampler.neighbours[leader].tolist())
    assert (
        "batches of neighbours: 40 training images embedded, groups of 4" in capsys.readouterr().out
    )
    # the embedding pass left the frozen norms in eval mode and the rest training
    assert module.training and all(not m.training for m in module.model.frozen_modules())


def test_the_callback_needs_instance_batches():
    with pytest.raises(ValueError, match="group_size >= 2"):
        NeighbourBatches(group_size=1)

    class Trainer:
        train_dataloader = type("Loader", (), {"batch_sampler": object()})()

    with pytest.raises(ValueError, match="needs sampler=instance, not object"):
        NeighbourBatches().on_train_epoch_start(Trainer(), None)  # type: ignore[arg-type]
