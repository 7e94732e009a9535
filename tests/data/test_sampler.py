from collections import Counter

import numpy as np
import pytest

from retrieval.data.sampler import InstanceBatchSampler, PKBatchSampler

LABELS = [f"l{i % 10}" for i in range(200)]  # 10 labels x 20 images


def batches(sampler: PKBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_batch_has_p_labels_with_k_images_each():
    sampler = PKBatchSampler(LABELS, labels_per_batch=4, samples_per_label=5)
    result = batches(sampler)
    assert len(result) == len(sampler) == 200 // 20
    for batch in result:
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {5}
        assert len(set(batch)) == 20  # no repeats inside a label with enough images


def test_deterministic_for_seed_and_epoch_and_different_across_epochs():
    a = PKBatchSampler(LABELS, 4, 5, seed=1)
    b = PKBatchSampler(LABELS, 4, 5, seed=1)
    assert batches(a, 3) == batches(b, 3)
    assert batches(a, 3) != batches(a, 4)
    assert batches(a, 0) != batches(PKBatchSampler(LABELS, 4, 5, seed=2), 0)


def test_ranks_get_disjoint_batches_of_equal_count():
    per_rank = [
        batches(PKBatchSampler(LABELS, 2, 4, seed=0, num_replicas=3, rank=r), 1) for r in range(3)
    ]
    assert len({len(b) for b in per_rank}) == 1
    single = batches(PKBatchSampler(LABELS, 2, 4, seed=0), 1)
    interleaved = [per_rank[i % 3][i // 3] for i in range(3 * len(per_rank[0]))]
    assert interleaved == single[: len(interleaved)]
    keys = [tuple(b) for rank in per_rank for b in rank]
    assert len(keys) == len(set(keys))


def test_two_ranks_split_the_single_process_sequence_by_position():
    """DDP with 2 processes: rank r takes global batches r, r + 2, ... of the sequence one
    process would draw (same seed and epoch), so the ranks never share a position, and the 25
    global batches of this set become 12 per rank (the odd last one is dropped on both)."""
    single = batches(PKBatchSampler(LABELS, 2, 4, seed=7), epoch=2)
    assert len(single) == 200 // 8 == 25
    ranks = [
        batches(PKBatchSampler(LABELS, 2, 4, seed=7, num_replicas=2, rank=r), epoch=2)
        for r in (0, 1)
    ]
    assert [len(b) for b in ranks] == [12, 12]
    positions = [[single.index(b) for b in rank] for rank in ranks]
    assert positions == [list(range(0, 24, 2)), list(range(1, 24, 2))]
    assert set(positions[0]).isdisjoint(positions[1])
    together = sorted(i for rank in ranks for b in rank for i in b)
    assert together == sorted(i for b in single[:24] for i in b)
    # an epoch later both ranks move on to the same new global sequence
    again = PKBatchSampler(LABELS, 2, 4, seed=7, num_replicas=2, rank=0)
    assert batches(again, epoch=3) == batches(PKBatchSampler(LABELS, 2, 4, seed=7), 3)[:24:2]


def test_small_labels_are_drawn_with_replacement_and_singletons_dropped():
    labels = ["a"] * 2 + ["b"] * 8 + ["c"] * 8 + ["d"]
    with pytest.warns(UserWarning, match="1 labels have a single image"):
        sampler = PKBatchSampler(labels, 2, 4, batches_per_epoch=30)
    seen = Counter()
    for batch in batches(sampler):
        assert len(batch) == 8
        seen.update(labels[i] for i in batch)
    assert "d" not in seen and seen["a"] > 0 and all(v % 4 == 0 for v in seen.values())


def test_bad_shapes_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="batch_size=30 cannot be filled"):
        PKBatchSampler(LABELS, samples_per_label=4, batch_size=30)
    with pytest.raises(ValueError, match="labels_per_batch=12 labels"):
        PKBatchSampler(LABELS, labels_per_batch=12, samples_per_label=2)
    assert PKBatchSampler(LABELS, samples_per_label=4, batch_size=32).p == 8
    assert np.array_equal(
        np.sort(np.concatenate([g for g in PKBatchSampler(LABELS).groups])), np.arange(200)
    )


IMAGES = ["same"] * 60  # instance training reads only the length of the labels


def test_instance_batches_hold_p_images_repeated_k_times():
    sampler = InstanceBatchSampler(IMAGES, images_per_batch=6, views_per_image=3)
    result = batches(sampler)
    assert len(result) == len(sampler) == 60 // 6
    assert sampler.batch_size == 18
    for batch in result:
        assert len(batch) == 18
        distinct = batch[::3]
        assert len(set(distinct)) == 6
        assert batch == [i for i in distinct for _ in range(3)]  # K views of one image in a row


def test_instance_epoch_visits_every_image_once():
    sampler = InstanceBatchSampler(IMAGES, images_per_batch=5, views_per_image=2, seed=3)
    for epoch in range(3):
        seen = [i for batch in batches(sampler, epoch) for i in batch[::2]]
        assert sorted(seen) == list(range(60))


def test_instance_epoch_leaves_out_the_remainder_only():
    sampler = InstanceBatchSampler(["x"] * 23, images_per_batch=5, views_per_image=2)
    seen = [i for batch in batches(sampler) for i in batch[::2]]
    assert len(seen) == len(set(seen)) == 20
    later = [i for batch in batches(sampler, 1) for i in batch[::2]]
    assert set(later) != set(seen)  # another 3 images wait this epoch out


def test_instance_deterministic_for_seed_and_epoch_and_shuffled():
    a = InstanceBatchSampler(IMAGES, 4, 2, seed=1)
    b = InstanceBatchSampler(IMAGES, 4, 2, seed=1)
    assert batches(a, 3) == batches(b, 3)
    assert batches(a, 3) != batches(a, 4)
    assert batches(a, 0) != batches(InstanceBatchSampler(IMAGES, 4, 2, seed=2), 0)
    first = [i for batch in batches(a, 0) for i in batch[::2]]
    assert first != sorted(first)


def test_instance_ranks_get_disjoint_images_of_equal_count():
    per_rank = [
        batches(InstanceBatchSampler(IMAGES, 4, 2, seed=0, num_replicas=3, rank=r), 1)
        for r in range(3)
    ]
    assert [len(b) for b in per_rank] == [5, 5, 5]
    images = [{i for batch in rank for i in batch} for rank in per_rank]
    assert all(images[a].isdisjoint(images[b]) for a in range(3) for b in range(a + 1, 3))
    single = batches(InstanceBatchSampler(IMAGES, 4, 2, seed=0), 1)
    assert [per_rank[i % 3][i // 3] for i in range(15)] == single


def test_instance_longer_epoch_continues_with_new_permutations():
    sampler = InstanceBatchSampler(["x"] * 10, 4, 2, batches_per_epoch=7)
    result = batches(sampler)
    assert len(result) == 7
    assert all(len(set(batch)) == 4 for batch in result)
    first, second = [b[::2] for b in result[:2]], [b[::2] for b in result[2:4]]
    assert first != second


def test_instance_fewer_images_than_p_fails_before_training():
    with pytest.raises(
        ValueError, match=r"sampler.images_per_batch=32.*has 20; use sampler.images_per_batch=20"
    ):
        InstanceBatchSampler(["x"] * 20, images_per_batch=32)
    with pytest.raises(ValueError, match="views_per_image >= 2"):
        InstanceBatchSampler(IMAGES, views_per_image=1)
    with pytest.raises(ValueError, match="rank 2"):
        InstanceBatchSampler(IMAGES, num_replicas=2, rank=2)


def test_instance_numbered_views_give_each_view_its_number_over_the_same_images():
    plain = batches(InstanceBatchSampler(IMAGES, images_per_batch=6, views_per_image=3, seed=4))
    numbered = batches(
        InstanceBatchSampler(
            IMAGES, images_per_batch=6, views_per_image=3, seed=4, numbered_views=True
        )
    )
    assert [[i for i, _ in batch] for batch in numbered] == plain
    assert all([v for _, v in batch] == [0, 1, 2] * 6 for batch in numbered)


def _ring_neighbours(n: int, m: int) -> np.ndarray:
    """Image i's neighbours are i+1 .. i+m (mod n): groups are runs of nearby indices."""
    return (np.arange(n)[:, None] + np.arange(1, m + 1)[None, :]) % n


def test_neighbour_batches_are_groups_of_an_image_and_its_neighbours():
    sampler = InstanceBatchSampler(IMAGES, images_per_batch=8, views_per_image=2, seed=5)
    sampler.use_neighbours(_ring_neighbours(60, 3), group_size=4)
    result = batches(sampler)
    assert len(result) == len(sampler) == 60 // 8
    for batch in result:
        images = batch[::2]
        assert batch == [i for i in images for _ in range(2)]
        assert len(set(images)) == 8
        for start in range(0, 8, 4):
            leader, *mates = images[start : start + 4]
            assert {(j - leader) % 60 for j in mates} == {1, 2, 3}  # all of its 3 neighbours
    leaders = [b[::2][s] for b in result for s in (0, 4)]
    assert len(set(leaders)) == len(leaders)  # leaders come from the permutation


def test_neighbour_batches_draw_at_random_among_more_neighbours_and_never_repeat():
    sampler = InstanceBatchSampler(IMAGES, images_per_batch=6, views_per_image=2, seed=1)
    sampler.use_neighbours(_ring_neighbours(60, 10), group_size=3)
    first, again = batches(sampler, 0), batches(sampler, 0)
    assert first == again  # seeded by (seed, epoch)
    assert first != batches(sampler, 1)
    offsets = set()
    for batch in first:
        images = batch[::2]
        assert len(set(images)) == 6
        for start in (0, 3):
            leader, *mates = images[start : start + 3]
            offsets |= {(j - leader) % 60 for j in mates}
    assert offsets <= set(range(1, 11)) and len(offsets) > 4  # drawn from all ten
    sampler.use_neighbours(None, 1)  # back to random batches, the same as never grouped
    assert batches(sampler) == batches(InstanceBatchSampler(IMAGES, 6, 2, seed=1))


def test_neighbour_groups_split_over_ranks_like_random_batches():
    def sampler(rank: int, replicas: int) -> InstanceBatchSampler:
        s = InstanceBatchSampler(IMAGES, 4, 2, seed=0, num_replicas=replicas, rank=rank)
        s.use_neighbours(_ring_neighbours(60, 4), group_size=2)
        return s

    per_rank = [batches(sampler(r, 3), 1) for r in range(3)]
    single = batches(sampler(0, 1), 1)
    assert [per_rank[i % 3][i // 3] for i in range(15)] == single


def test_neighbours_of_the_wrong_shape_or_group_fail_clearly():
    sampler = InstanceBatchSampler(IMAGES, images_per_batch=4, views_per_image=2)
    with pytest.raises(ValueError, match=r"neighbours must be \(60, m\)"):
        sampler.use_neighbours(np.zeros((59, 3), dtype=int), 2)
    with pytest.raises(ValueError, match="group_size must be 2..4"):
        sampler.use_neighbours(_ring_neighbours(60, 3), 5)
