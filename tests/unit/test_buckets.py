import pytest

from relay_train.data.buckets import BucketBatchSampler, bucket_for


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


# Worked by hand: aspect = round(W/H, 2); pixel_area → w = √(R²·a), h = √(R²/a); pixel → short side R;
# each side → nearest multiple of the alignment (at least one alignment step).
@pytest.mark.parametrize("size, resolution, kind, alignment, expected", [
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
])
def test_bucket_table(size, resolution, kind, alignment, expected):
    assert bucket_for(*size, resolution=resolution, resolution_type=kind, rounding=2, alignment=alignment) == expected


SIZES = {(64, 64): 8, (80, 48): 6, (48, 80): 4, (96, 48): 2}  # 20 samples → 10 batches of 2


def _ranks(world, **kw):
    return [BucketBatchSampler(SIZES, 2, seed=7, rank=r, world_size=world, **kw) for r in range(world)]


def _steps(samplers, n):
    """n lock-step steps of every rank: the global batches they take, in order."""
    return [s.next_batch() for _ in range(n) for s in samplers]


def _key(batch):
    return batch[0], tuple(batch[1])


def test_two_ranks_cover_every_sample_exactly_once_per_epoch():
    ranks = _ranks(2)
    assert ranks[0].batches_per_epoch() == 5
    taken = _steps(ranks, 5)
    samples = [(bucket, i) for bucket, idx in taken for i in idx]
    assert len(samples) == len(set(samples)) == sum(SIZES.values())


def test_two_rank_resume_mid_epoch_continues_the_exact_sequence():
    straight = _steps(_ranks(2), 8)  # crosses into epoch 1
    first = _ranks(2)
    head = _steps(first, 3)
    resumed = _ranks(2)
    for old, new in zip(first, resumed):
        new.load_state_dict(old.state_dict())
    assert head + _steps(resumed, 5) == straight


def _samples(batches):
    return [(bucket, i) for bucket, idx in batches for i in idx]


def _until_epoch_ends(samplers, limit=50):
    """Lock-step steps until the ranks roll into the next epoch; the batches taken before that."""
    taken = []
    for _ in range(limit):
        step = [s.next_batch() for s in samplers]
        if samplers[0].epoch != 0:
            return taken, step
        taken += step
    raise AssertionError("the epoch never ended")


def test_resume_from_two_ranks_on_three_neither_repeats_nor_skips(caplog):
    sizes = {(64, 64): 14, (80, 48): 10}  # 24 samples: 12 global batches of 2
    two = [BucketBatchSampler(sizes, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    done = _steps(two, 2)  # 4 global batches
    three = [BucketBatchSampler(sizes, 2, seed=7, rank=r, world_size=3) for r in range(3)]
    with caplog.at_level("WARNING"):
        for sampler in three:
            sampler.load_state_dict(two[0].state_dict())
    assert "resuming epoch 0 on 3 rank(s) × batch 2 (saved on 2 × 2): 8 samples" in caplog.text
    rest, first_of_next = _until_epoch_ends(three)
    seen = _samples(done + rest)
    assert len(seen) == len(set(seen))  # nothing repeated
    assert len(seen) == 24 - 4  # 8 batches remained: 2 whole 3-rank steps, 2 trimmed (< one global batch)
    assert first_of_next == [three[0].global_batches(1)[r] for r in range(3)]  # then a whole, fresh epoch


def test_three_ranks_back_to_two():
    three = _ranks(3)
    done = _steps(three, 1)
    two = _ranks(2)
    for sampler in two:
        sampler.load_state_dict(three[1].state_dict())
    rest, _ = _until_epoch_ends(two)
    seen = _samples(done + rest)
    assert len(seen) == len(set(seen)) == 20 - 2  # 7 batches remained: 3 steps of 2, one trimmed


def test_global_batches_regrow_when_the_world_grows():
    """The trainer's layout: one sampler dealing global batches of train_batch_size × world_size."""
    sizes = {(64, 64): 24, (80, 48): 12}
    old = BucketBatchSampler(sizes, 4, seed=5)  # 2 ranks × 2
    done = [old.next_batch() for _ in range(3)]
    new = BucketBatchSampler(sizes, 6, seed=5)  # 3 ranks × 2
    new.load_state_dict(old.state_dict())
    rest, _ = _until_epoch_ends([new])
    seen = _samples(done + rest)
    assert len(seen) == len(set(seen)) and all(len(i) == 6 for _, i in rest)
    assert 36 - len(seen) < 6 * len(sizes)  # only each bucket's last partial batch is dropped


def test_changed_dataset_is_named_on_resume(caplog):
    sampler = BucketBatchSampler({(64, 64): 8}, 2, seed=1)
    state = sampler.state_dict()
    with caplog.at_level("WARNING"):
        BucketBatchSampler({(64, 64): 10}, 2, seed=1).load_state_dict(state)
    assert "buckets changed" in caplog.text
