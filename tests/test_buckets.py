"""Buckets: a dataset of several latent shapes gives one-shape global batches, deterministic,
exactly resumable, world-size invariant, with no sample dropped (in-process; the 2-process
launch is in test_data_processes.py)."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from test_data import stream as data_stream
from test_data import take as data_take

from accel_distill.data import write_parquet
from accel_distill.errors import DataError
from accel_distill.testing.datasets import mixed_shape_samples as mixed_samples

VIDEO, IMAGE, WIDE = (16, 2, 4, 4), (16, 1, 4, 4), (16, 2, 4, 6)


@pytest.fixture
def mixed(tmp_path):
    """11 videos, 7 images, 2 wide videos (a bucket smaller than a global batch of 4), in two files."""
    samples = mixed_samples({VIDEO: 11, IMAGE: 7, WIDE: 2})
    write_parquet(tmp_path / "d" / "a.parquet", samples[:12], row_group_size=5)
    write_parquet(tmp_path / "d" / "b.parquet", samples[12:], row_group_size=3)
    return tmp_path / "d", samples


def stream(path, **kw):
    """test_data's stream with a global batch of 4 and text up to 4 tokens."""
    return data_stream(path, **{"batch_size": 4, "text_max_length": 4, **kw})


def take(s, k):
    return data_take(s, k)


def test_every_batch_has_one_shape_and_no_sample_is_dropped(mixed):
    path, samples = mixed
    s = stream(path)
    assert s.buckets == [IMAGE, VIDEO, WIDE] and s.bucket_sizes == [7, 11, 2]
    it = iter(s)
    consumed = []
    while s.epoch < 4:  # up to the start of epoch 4
        batch = next(it)
        assert len({tuple(batch["latents"].shape[1:])}) == 1
        for i, key in enumerate(batch["sample_keys"]):
            assert batch["ids"][i].startswith("x".join(map(str, batch["latents"].shape[1:])))
            consumed.append(tuple(key))
    carried = [tuple(k) for k in s.state_dict()["carry"]]
    assert len(set(consumed)) == len(consumed)
    # what was trained on plus what is carried into epoch 4 is every sample of epochs 0-3, once
    assert sorted(consumed + carried) == sorted((e, r) for e in range(4) for r in range(len(samples)))
    assert all(r < len(samples) for _, r in carried) and len(carried) < 3 * 4
    wide = [k for k in consumed if samples_shape(s, k[1]) == WIDE]
    assert len(wide) == 8  # the 2-sample bucket trained twice in 4 epochs, from carried rows


def samples_shape(s, row):
    return s.bucket_shape_of(row)


def test_buckets_interleave_in_proportion(tmp_path):
    samples = mixed_samples({VIDEO: 40, IMAGE: 40}, seed=1)
    write_parquet(tmp_path / "d.parquet", samples, row_group_size=8)
    shapes = [tuple(b["latents"].shape[1:]) for b in take(stream(tmp_path / "d.parquet"), 20)]
    assert Counter(shapes) == {VIDEO: 10, IMAGE: 10}
    runs = [len(list(g)) for _, g in itertools.groupby(shapes)]
    assert len(runs) > 4  # interleaved, not one bucket after the other


def test_deterministic_and_seeded(mixed):
    path, _ = mixed
    a = [b["ids"] for b in take(stream(path), 12)]
    assert a == [b["ids"] for b in take(stream(path), 12)]
    assert a == [b["ids"] for b in take(stream(path, prefetch=2), 12)]
    assert a != [b["ids"] for b in take(stream(path, seed=1), 12)]


@pytest.mark.parametrize("k", [1, 4, 5, 9, 13])  # inside epoch 0, at / after epoch boundaries with carry
def test_exact_resume_with_carried_rows(mixed, k):
    path, _ = mixed
    reference = take(stream(path), k + 6)
    first = stream(path)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    resumed = stream(path, prefetch=2)
    resumed.load_state_dict(state)
    for ref, got in zip(reference[k:], take(resumed, 6)):
        assert ref["ids"] == got["ids"] and ref["sample_keys"] == got["sample_keys"]
        assert torch.equal(ref["latents"], got["latents"]) and torch.equal(ref["text_embeds"], got["text_embeds"])


def test_two_ranks_see_what_one_rank_sees_with_buckets(mixed):
    path, _ = mixed
    one = stream(path, batch_size=4)
    two = [stream(path, batch_size=2, rank=r, world_size=2) for r in range(2)]
    it1, it2 = iter(one), [iter(t) for t in two]
    for _ in range(11):  # crosses epochs with carried rows
        single = next(it1)
        halves = [next(i) for i in it2]
        assert single["ids"] == halves[0]["ids"] + halves[1]["ids"]
        assert torch.equal(single["latents"], torch.cat([h["latents"] for h in halves]))
    assert one.state_dict() == {**two[0].state_dict(), "world_size": 1}
    resumed = [stream(path, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(one.state_dict())  # saved with 1 process, resumed with 2
    single = next(it1)
    assert single["ids"] == sum((next(iter(r))["ids"] for r in resumed), [])


def test_a_small_bucket_is_reported(mixed, caplog):
    path, _ = mixed
    with caplog.at_level(logging.WARNING, logger="accel_distill.data.stream"):
        s = stream(path)
    assert "3 latent shape bucket(s)" in caplog.text
    assert "bucket 16x2x4x6: 2 samples, fewer than a global batch of 4: it fills a batch every 2 epochs" in caplog.text
    assert (
        s.describe_buckets()[1]
        == "bucket 16x2x4x4: 11 samples, 2 batches of 4 per epoch, 3 left over carried into the next epoch"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accel_distill.data.stream"):
        stream(path, rank=1, world_size=2, batch_size=2)
    assert not caplog.text  # rank 0 reports


def test_global_batch_change_on_resume(mixed, tmp_path):
    path, _ = mixed
    s = stream(path)
    it = iter(s)
    next(it)
    with pytest.raises(DataError, match="global batch was 4 .*, now 2: resume with the same global batch"):
        stream(path, batch_size=2).load_state_dict(s.state_dict())
    # one bucket: a position that is a multiple of the new global batch resumes exactly
    write_parquet(tmp_path / "one.parquet", mixed_samples({VIDEO: 10}), row_group_size=4)
    one = stream(tmp_path / "one.parquet")
    first = take(one, 3)  # 12 samples: epoch 0 (2 batches, 2 carried), then 1 batch of epoch 1
    halves = stream(tmp_path / "one.parquet", batch_size=2)
    halves.load_state_dict(stream(tmp_path / "one.parquet").state_dict())
    assert sum((b["ids"] for b in take(halves, 6)), []) == sum((b["ids"] for b in first), [])
    odd = stream(tmp_path / "one.parquet", batch_size=3)
    with pytest.raises(DataError, match="or from a checkpoint at a multiple of the new one"):
        odd.load_state_dict(one.state_dict())  # index 4 of epoch 1 is not a multiple of 3


def test_state_of_the_older_reader_resumes(mixed):
    path, _ = mixed
    s = stream(path)
    it = iter(s)
    next(it), next(it)
    old = {k: v for k, v in s.state_dict().items() if k not in ("carry", "global_batch", "buckets")}
    resumed = stream(path)
    resumed.load_state_dict(old)  # epoch 0 carries nothing: the same position
    assert next(iter(resumed))["ids"] == next(it)["ids"]


def test_changed_shapes_are_refused_on_resume(mixed, tmp_path):
    path, samples = mixed
    state = stream(path).state_dict()
    samples[0]["latent"] = torch.zeros(WIDE, dtype=torch.bfloat16)  # same count, other buckets
    write_parquet(tmp_path / "other.parquet", samples)
    with pytest.raises(DataError, match="latent shapes: the dataset's buckets differ"):
        stream(tmp_path / "other.parquet").load_state_dict(state)


def test_footer_shapes_that_lie_are_caught_on_read(tmp_path):
    import pyarrow.parquet as pq

    samples = mixed_samples({VIDEO: 6})
    path = tmp_path / "d.parquet"
    write_parquet(path, samples, row_group_size=3)
    table = pq.read_table(path)
    shapes = table.column("vae_latent_shape").to_pylist()
    shapes[4] = [16, 1, 4, 8]  # same byte size, other shape; the footer still says VIDEO
    table = table.set_column(table.schema.get_field_index("vae_latent_shape"), "vae_latent_shape", [shapes])
    pq.write_table(table, path, row_group_size=3)
    s = stream(path, batch_size=1, shuffle=False)
    with pytest.raises(DataError, match=r"row 4 .*latent shape \[16, 1, 4, 8\] differs from \[16, 2, 4, 4\] recorded"):
        take(s, 6)


def test_epoch_plan_batches_are_single_bucket(mixed):
    path, _ = mixed
    s = stream(path)
    plan = s.epoch_plan(0)
    buckets = s._bucket_of[plan.rows]
    assert (buckets == buckets[:, :1]).all()
    assert np.array_equal(np.sort(np.concatenate([plan.rows.reshape(-1), plan.carry_out[:, 1]])), np.arange(20))
