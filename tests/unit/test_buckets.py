import pytest

from relay_train.data.buckets import BucketBatchSampler, bucket_for
from relay_train.parallel import shard_of


@pytest.mark.parametrize(
    "size, expected",
    [((1024, 1024), (1024, 1024)), ((1536, 1024), (1280, 832)), ((1024, 1536), (832, 1280)), ((2048, 1024), (1472, 704))],
)
def test_pixel_area_buckets_hold_about_a_megapixel(size, expected):
    bucket = bucket_for(*size, resolution=1024, resolution_type="pixel_area", rounding=2, alignment=64)
    assert bucket == expected
    assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0
    assert abs(bucket[0] * bucket[1] / 1024**2 - 1) < 0.15


def test_pixel_resolution_sets_the_short_side():
    assert bucket_for(1500, 1000, resolution=512, resolution_type="pixel", rounding=2, alignment=64) == (768, 512)


def test_rounding_merges_near_aspects():
    a = bucket_for(1000, 667, 1024, "pixel_area", rounding=1, alignment=16)
    b = bucket_for(1000, 680, 1024, "pixel_area", rounding=1, alignment=16)
    assert a == b


def _drain(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_never_mixes_buckets_and_covers_each_epoch():
    sizes = {(64, 64): 5, (80, 48): 4}
    sampler = BucketBatchSampler(sizes, batch_size=2, seed=3)
    epoch = _drain(sampler, sampler.batches_per_epoch())
    assert sampler.batches_per_epoch() == 4  # pruning drops the odd one out of the 5
    seen = {(b, i) for b, idx in epoch for i in idx}
    assert len(seen) == 8 and all(len(idx) == 2 for _, idx in epoch)


def test_sampler_keeps_partial_batches_when_pruning_is_disabled():
    sampler = BucketBatchSampler({(64, 64): 5}, batch_size=2, seed=3, keep_partial_batches=True)
    assert sorted(len(i) for _, i in _drain(sampler, 3)) == [1, 2, 2]


def test_sampler_resumes_exactly():
    sizes = {(64, 64): 7, (80, 48): 6, (48, 80): 3}
    straight = BucketBatchSampler(sizes, 2, seed=11)
    expected = _drain(straight, 20)
    first = BucketBatchSampler(sizes, 2, seed=11)
    head = _drain(first, 9)
    resumed = BucketBatchSampler(sizes, 2, seed=11)
    resumed.load_state_dict(first.state_dict())
    assert head + _drain(resumed, 11) == expected


def test_epochs_reshuffle():
    sampler = BucketBatchSampler({(64, 64): 8}, 2, seed=0)
    assert _drain(sampler, 4) != _drain(sampler, 4)


def test_ranks_get_disjoint_equal_shares():
    sizes = {(64, 64): 13, (80, 48): 4}
    sampler = _world(2, sizes, seed=5)
    assert sampler.batches_per_epoch() == 4  # global batches of 2 × 2: 3 + 1, the odd one out dropped
    taken = _steps(sampler, 2, 4)
    assert all(len(indices) == 2 for _, indices in taken)  # every rank steps 4 times on 2 samples
    a, b = (set(_samples(taken[r::2])) for r in range(2))
    assert len(a) == len(b) == 8 and not a & b


def test_impossible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="train_batch_size"):
        BucketBatchSampler({(64, 64): 1}, batch_size=4, seed=0)


def test_state_from_another_seed_is_refused():
    sampler = BucketBatchSampler({(64, 64): 4}, 2, seed=1)
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({"epoch": 0, "position": 1, "seed": 2})


# Worked by hand: aspect = round(W/H, 2); pixel_area → w = √(R²·a), h = √(R²/a); pixel → short side R;
# each side → nearest multiple of the alignment (at least one alignment step).
@pytest.mark.parametrize(
    "size, resolution, kind, alignment, expected",
    [
        ((1344, 768), 1024, "pixel_area", 64, (1344, 768)),  # a=1.75: √(1048576·1.75)=1354.6→1344, 774.1→768
        ((4096, 512), 1024, "pixel_area", 64, (2880, 384)),  # a=8: 2896.3→2880 (45.25·64), 362.0→384 (5.66·64)
        ((512, 4096), 1024, "pixel_area", 64, (384, 2944)),  # a=round(0.125,2)=0.12, not a mirror: 354.7→384, 2956.0→2944
        ((10000, 100), 1024, "pixel_area", 64, (10240, 128)),  # a=100: 10240 exactly; 102.4→128 (1.6·64)
        ((100, 10000), 1024, "pixel_area", 64, (128, 10240)),  # a=0.01: 102.4→128, 10240 exactly
        ((1, 1000), 1024, "pixel_area", 64, (64, 32384)),  # round(0.001, 2)=0 → exact a: 32.4→64, 32382→32384
        ((3000, 1000), 1024, "pixel", 64, (3072, 1024)),  # a=3: long side 3072
        ((1000, 3000), 1024, "pixel", 64, (1024, 3072)),  # a=0.33: 1024/0.33=3103.0→48.48→3072
        ((128, 64), 64, "pixel_area", 16, (96, 48)),  # the demo: a=2: √8192=90.5→96 (5.66·16), 45.25→48
        ((64, 96), 64, "pixel_area", 16, (48, 80)),  # a=0.67: √2744.3=52.4→48, √6113.4=78.2→80
        ((30, 30), 1024, "pixel_area", 64, (1024, 1024)),  # tiny squares upscale into the 1 MP bucket
    ],
)
def test_bucket_table(size, resolution, kind, alignment, expected):
    assert bucket_for(*size, resolution=resolution, resolution_type=kind, rounding=2, alignment=alignment) == expected


SIZES = {(64, 64): 8, (80, 48): 4, (48, 80): 4, (96, 48): 4}  # 20 samples → 5 global batches of 2 ranks × 2


def _world(world, sizes=SIZES, seed=7, **kw):
    """The trainer's layout: one sampler dealing global batches of 2 samples per rank × world."""
    return BucketBatchSampler(sizes, 2 * world, seed=seed, **kw)


def _shares(batch, world):
    """What each rank trains on: its shard_of the global batch, as the Trainer takes it."""
    bucket, indices = batch
    return [(bucket, tuple(indices[shard_of(len(indices), rank, world)])) for rank in range(world)]


def _steps(sampler, world, n):
    """n lock-step steps of every rank: each rank's share of each global batch, in order."""
    return [share for _ in range(n) for share in _shares(sampler.next_batch(), world)]


def test_two_ranks_cover_every_sample_exactly_once_per_epoch():
    sampler = _world(2)
    assert sampler.batches_per_epoch() == 5
    taken = _steps(sampler, 2, 5)
    assert all(len(indices) == 2 for _, indices in taken)  # equal shares: the ranks stay in step
    samples = [(bucket, i) for bucket, idx in taken for i in idx]
    assert len(samples) == len(set(samples)) == sum(SIZES.values())


def test_two_rank_resume_mid_epoch_continues_the_exact_sequence():
    straight = _steps(_world(2), 2, 8)  # crosses into epoch 1
    first = _world(2)
    head = _steps(first, 2, 3)
    resumed = _world(2)
    resumed.load_state_dict(first.state_dict())
    assert head + _steps(resumed, 2, 5) == straight


def _samples(batches):
    return [(bucket, i) for bucket, idx in batches for i in idx]


def _until_epoch_ends(sampler, world, limit=50):
    """Lock-step steps until the sampler rolls into the next epoch: every rank's shares before that, and
    the shares of the first step after."""
    taken = []
    for _ in range(limit):
        step = _shares(sampler.next_batch(), world)
        if sampler.epoch != 0:
            return taken, step
        taken += step
    raise AssertionError("the epoch never ended")


def _recut_coverage(sizes, done, batch):
    """Samples an epoch covers when `done` were taken and the rest of each bucket is cut into `batch`es:
    only each bucket's last partial batch is dropped."""
    used = {b: sum(len(i) for bb, i in done if bb == b) for b in sizes}
    return sum(used[b] + (sizes[b] - used[b]) // batch * batch for b in sizes)


def test_resume_from_two_ranks_on_three_neither_repeats_nor_skips(caplog):
    sizes = {(64, 64): 14, (80, 48): 10}  # 24 samples
    two = _world(2, sizes)
    done = _steps(two, 2, 2)  # 2 global batches of 4
    three = _world(3, sizes)
    with caplog.at_level("WARNING"):
        three.load_state_dict(two.state_dict())
    assert "resuming epoch 0 with batches of 6 (saved with 4): 8 samples" in caplog.text
    rest, first_of_next = _until_epoch_ends(three, 3)
    assert all(len(indices) == 2 for _, indices in rest)  # every rank steps on 2 samples
    seen = _samples(done + rest)
    assert len(seen) == len(set(seen))  # nothing repeated
    assert len(seen) == _recut_coverage(sizes, done, 6)  # nothing skipped beyond each bucket's last partial batch
    assert first_of_next == _shares(three.global_batches(1)[0], 3)  # then a whole, fresh epoch


def test_three_ranks_back_to_two():
    three = _world(3)
    done = _steps(three, 3, 1)
    two = _world(2)
    two.load_state_dict(three.state_dict())
    rest, _ = _until_epoch_ends(two, 2)
    seen = _samples(done + rest)
    assert len(seen) == len(set(seen)) == _recut_coverage(SIZES, done, 4)


def test_global_batches_regrow_when_the_world_grows():
    """The trainer's layout: one sampler dealing global batches of train_batch_size × world_size."""
    sizes = {(64, 64): 24, (80, 48): 12}
    old = BucketBatchSampler(sizes, 4, seed=5)  # 2 ranks × 2
    done = [old.next_batch() for _ in range(3)]
    new = BucketBatchSampler(sizes, 6, seed=5)  # 3 ranks × 2
    new.load_state_dict(old.state_dict())
    rest, _ = _until_epoch_ends(new, 1)
    seen = _samples(done + rest)
    assert len(seen) == len(set(seen)) and all(len(i) == 6 for _, i in rest)
    assert 36 - len(seen) < 6 * len(sizes)  # only each bucket's last partial batch is dropped


def test_changed_dataset_is_named_on_resume(caplog):
    sampler = BucketBatchSampler({(64, 64): 8}, 2, seed=1)
    state = sampler.state_dict()
    with caplog.at_level("WARNING"):
        BucketBatchSampler({(64, 64): 10}, 2, seed=1).load_state_dict(state)
    assert "buckets changed" in caplog.text
