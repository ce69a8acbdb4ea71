import pytest

from relay_train.buckets import BucketBatchSampler, bucket_for


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
    sizes = {(64, 64): 9, (80, 48): 4}
    shards = [BucketBatchSampler(sizes, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    counts = {s.batches_per_epoch() for s in shards}
    assert counts == {3}  # 4 + 2 = 6 batches → 3 each
    a, b = (set((bk, tuple(i)) for bk, i in _drain(s, 3)) for s in shards)
    assert not a & b


def test_impossible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="train_batch_size"):
        BucketBatchSampler({(64, 64): 1}, batch_size=4, seed=0)


def test_state_from_another_seed_is_refused():
    sampler = BucketBatchSampler({(64, 64): 4}, 2, seed=1)
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({"epoch": 0, "position": 1, "seed": 2})
