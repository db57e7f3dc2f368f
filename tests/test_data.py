"""Tests of accel_distill.data: the parquet format and the resumable LatentStream (offline, tiny tensors)."""

from __future__ import annotations

import gc
import itertools
import re
import threading
import time
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from accel_distill.data import LatentStream, bytes_to_tensor, tensor_to_bytes, write_parquet
from accel_distill.data import reader as reader_module
from accel_distill.data.schema import _arrow_schema
from accel_distill.errors import DataError


def esc(path):
    return re.escape(str(path))


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LATENT_SHAPE = (16, 2, 4, 4)
TEXT_DIM = 32


def make_samples(n, *, prefix="s", latent_dtype=torch.bfloat16, text_dtype=torch.bfloat16, latents=True, seed=0):
    """n samples with random latents [16,2,4,4] and text [L<=8, 32] of varying length L."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        s = {
            "id": f"{prefix}{i:03d}",
            "text_embedding": torch.randn(1 + i % 8, TEXT_DIM, generator=g).to(text_dtype),
            "caption": f"caption {prefix}{i}",
        }
        if latents:
            s["latent"] = torch.randn(*LATENT_SHAPE, generator=g).to(latent_dtype)
        samples.append(s)
    return samples


def stream(path, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("seed", 0)
    kw.setdefault("text_max_length", 8)
    kw.setdefault("prefetch", 0)
    return LatentStream(str(path), **kw)


def take(s, k, it=None):
    return list(itertools.islice(it if it is not None else iter(s), k))


def ids_of(batches):
    return [i for b in batches for i in b["ids"]]


@pytest.fixture
def dataset(tmp_path):
    """10 samples in row groups of 3 (uneven last group): exercises cross-group batches."""
    samples = make_samples(10)
    path = tmp_path / "data.parquet"
    write_parquet(path, samples, row_group_size=3)
    return path, samples


# -- format ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_bytes_round_trip(dtype):
    t = torch.randn(3, 5).to(dtype)
    b, shape, name = tensor_to_bytes(t)
    assert shape == [3, 5] and name == str(dtype).removeprefix("torch.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable buffer" warning
        back = bytes_to_tensor(b, shape, name)
    assert back.dtype == dtype and torch.equal(back, t)
    back += 1  # owns writable memory
    assert torch.equal(bytes_to_tensor(b, shape, name), t)


def test_bytes_to_tensor_rejects_wrong_size_and_unknown_dtype():
    b, shape, _ = tensor_to_bytes(torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="bytes"):
        bytes_to_tensor(b, shape, "float32")
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        bytes_to_tensor(b, shape, "float8")


def test_write_parquet_columns_and_row_groups(tmp_path):
    samples = make_samples(5)
    samples[0]["fps"] = 16.0
    samples[1]["width"] = 832
    path = tmp_path / "sub" / "d.parquet"
    write_parquet(path, samples, row_group_size=2)
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == 3 and f.metadata.num_rows == 5
    names = f.schema_arrow.names
    assert names[:8] == [
        "id",
        "vae_latent_bytes",
        "vae_latent_shape",
        "vae_latent_dtype",
        "text_embedding_bytes",
        "text_embedding_shape",
        "text_embedding_dtype",
        "caption",
    ]
    assert set(names[8:]) == {"fps", "width"}
    table = f.read()
    assert table.column("fps").to_pylist() == [16.0, None, None, None, None]
    assert table.column("vae_latent_dtype").to_pylist() == ["bfloat16"] * 5


@pytest.mark.parametrize("type_", [pa.binary(), pa.large_binary(), pa.string()])
def test_value_buffers_are_the_values(type_):
    values = ["ab", "", "cde", None, "xy"] if type_ == pa.string() else [b"ab", b"", b"cde", None, b"xy"]
    column = pa.chunked_array([pa.array(values[:3], type_).slice(1), pa.array(values[3:], type_), pa.array([], type_)])
    assert [bytes(b) for b in reader_module.value_buffers(column)] == [b"", b"cde", b"", b"xy"]
    assert reader_module.value_buffers(pa.chunked_array([pa.array([b""], type_)], type_)) != []


# -- batches ------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dtype,text_dtype", [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16)])
def test_stream_round_trip_keeps_stored_dtype(tmp_path, latent_dtype, text_dtype):
    samples = make_samples(6, latent_dtype=latent_dtype, text_dtype=text_dtype)
    write_parquet(tmp_path / "d.parquet", samples, row_group_size=4)
    by_id = {s["id"]: s for s in samples}
    s = stream(tmp_path / "d.parquet", batch_size=3, shuffle=False)
    for batch in take(s, 2):
        assert batch["latents"].dtype == latent_dtype and batch["latents"].shape == (3, *LATENT_SHAPE)
        assert batch["text_embeds"].dtype == text_dtype and batch["text_embeds"].shape == (3, 8, TEXT_DIM)
        for i, sid in enumerate(batch["ids"]):
            ref = by_id[sid]
            assert torch.equal(batch["latents"][i], ref["latent"])
            L = ref["text_embedding"].shape[0]
            assert torch.equal(batch["text_embeds"][i, :L], ref["text_embedding"])
            assert batch["captions"][i] == ref["caption"]


def test_text_is_zero_padded_at_the_end(dataset):
    path, samples = dataset
    batch = next(iter(stream(path, batch_size=4, shuffle=False, text_max_length=12)))
    assert batch["text_embeds"].shape == (4, 12, TEXT_DIM)
    for i in range(4):
        L = samples[i]["text_embedding"].shape[0]
        assert torch.equal(batch["text_embeds"][i, :L], samples[i]["text_embedding"])
        assert not batch["text_embeds"][i, L:].any()


def test_text_only_data_has_no_latents(tmp_path):
    write_parquet(tmp_path / "t.parquet", make_samples(4, latents=False))
    s = stream(tmp_path / "t.parquet", require_latents=False)
    batch = next(iter(s))
    assert "latents" not in batch and set(batch) == {"text_embeds", "ids", "captions", "sample_keys", "row_sources"}
    assert batch["text_embeds"].shape == (2, 8, TEXT_DIM)


def test_directory_and_list_of_paths(tmp_path):
    write_parquet(tmp_path / "d" / "b.parquet", make_samples(3, prefix="b"))
    write_parquet(tmp_path / "d" / "nested" / "c.parquet", make_samples(3, prefix="c"))
    write_parquet(tmp_path / "a.parquet", make_samples(2, prefix="a"))
    s = stream(tmp_path / "d", batch_size=1, shuffle=False)
    assert ids_of(take(s, 6)) == ["b000", "b001", "b002", "c000", "c001", "c002"]
    s = LatentStream([str(tmp_path / "a.parquet"), str(tmp_path / "d")], batch_size=8, seed=0, text_max_length=8)
    assert sorted(ids_of(take(s, 1))) == ["a000", "a001", "b000", "b001", "b002", "c000", "c001", "c002"]


# -- order, epochs, ranks ---------------------------------------------------------------------


def test_each_epoch_visits_every_sample_once_and_order_changes(dataset):
    path, samples = dataset
    all_ids = sorted(s["id"] for s in samples)
    s = stream(path, batch_size=2)
    assert s.samples_per_epoch == 10 and s.batches_per_epoch == 5
    it = iter(s)
    epochs = [ids_of(take(s, 5, it)) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == all_ids
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert s.epoch == 3
    same_seed = stream(path, batch_size=2)
    assert ids_of(take(same_seed, 10)) == epochs[0] + epochs[1]
    other_seed = stream(path, batch_size=2, seed=1)
    assert ids_of(take(other_seed, 5)) != epochs[0]


def test_no_shuffle_is_file_order_over_and_over(dataset):
    path, samples = dataset
    s = stream(path, batch_size=3, shuffle=False)  # 10 rows: epoch 0 carries row 9 into epoch 1
    ids = [x["id"] for x in samples]
    assert ids_of(take(s, 7)) == (ids * 3)[:21]


def test_two_ranks_are_disjoint_and_no_sample_is_dropped(tmp_path):
    samples = make_samples(13)
    write_parquet(tmp_path / "d.parquet", samples, row_group_size=4)
    ranks = [stream(tmp_path / "d.parquet", batch_size=3, rank=r, world_size=2) for r in range(2)]
    assert [r.samples_per_epoch for r in ranks] == [6, 6]
    its = [iter(r) for r in ranks]
    seen, keys = [], []
    for _ in range(13):  # 13 global batches of 6 = 6 epochs of 13, the remainders carried
        batches = [next(it) for it in its]
        assert not set(batches[0]["ids"]) & set(batches[1]["ids"])
        seen += ids_of(batches)
        keys += [k for b in batches for k in b["sample_keys"]]
    assert sorted(seen) == sorted([s["id"] for s in samples] * 6)  # every sample once per epoch
    assert len(set(keys)) == len(keys)  # (epoch, row) names each sample instance once
    assert ranks[0].state_dict() == ranks[1].state_dict() and ranks[0].epoch == 6


# -- resume --------------------------------------------------------------------------


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["ids"] == y["ids"] and x["captions"] == y["captions"]
        assert torch.equal(x["latents"], y["latents"]) and torch.equal(x["text_embeds"], y["text_embeds"])


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("k", [2, 3, 4])  # mid-epoch, exactly at the boundary, just after it
def test_exact_resume_across_epoch_boundary(dataset, prefetch, k):
    path, _ = dataset
    reference = take(stream(path, batch_size=3, prefetch=prefetch), k + 5)  # 3 batches/epoch
    first = stream(path, batch_size=3, prefetch=prefetch)
    it = iter(first)
    assert_same_batches(take(first, k, it), reference[:k])
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == (k // 3, 3 * (k % 3))
    resumed = stream(path, batch_size=3, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert resumed.epoch == k // 3
    assert_same_batches(take(resumed, 5), reference[k:])
    del it


def test_prefetch_state_counts_consumed_batches_only(dataset, monkeypatch):
    path, _ = dataset
    read_ahead = []  # batches read by the prefetch thread
    real_batch = reader_module.Reader.batch

    def counting_batch(self, rows):
        if threading.current_thread() is not threading.main_thread():
            read_ahead.append(1)
        return real_batch(self, rows)

    monkeypatch.setattr(reader_module.Reader, "batch", counting_batch)
    plain, ahead = stream(path, prefetch=0), stream(path, prefetch=3)
    it_plain, it_ahead = iter(plain), iter(ahead)
    for k in range(1, 8):
        take(plain, 1, it_plain)
        take(ahead, 1, it_ahead)
        deadline = time.monotonic() + 5
        while len(read_ahead) < k + 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(read_ahead) >= k + 2, "the prefetch thread did not read ahead"
        assert ahead.state_dict() == plain.state_dict()
        assert (plain.state_dict()["epoch"], plain.state_dict()["index"]) == (k // 5, 2 * (k % 5))


def test_load_state_dict_restarts_a_running_iterator(dataset):
    path, _ = dataset
    s = stream(path, prefetch=2)
    it = iter(s)
    start = s.state_dict()
    first = take(s, 3, it)
    s.load_state_dict(start)
    assert_same_batches(take(s, 3, it), first)


def test_resume_rejects_a_different_dataset(dataset, tmp_path):
    path, _ = dataset
    state = stream(path).state_dict()
    write_parquet(tmp_path / "other.parquet", make_samples(12))
    with pytest.raises(DataError, match="num_samples"):
        stream(tmp_path / "other.parquet").load_state_dict(state)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "LatentStream-prefetch"]


def test_prefetch_thread_stops_when_iterator_is_dropped(dataset):
    path, _ = dataset
    s = stream(path, prefetch=2)
    it = iter(s)
    take(s, 2, it)
    assert prefetch_threads()
    del it
    gc.collect()
    assert not prefetch_threads()


# -- errors -------------------------------------------------------------------------------


def test_no_parquet_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no parquet files found at {esc(tmp_path / 'empty')}"):
        stream(tmp_path / "empty")
    with pytest.raises(DataError, match="no parquet files found at .*missing.parquet"):
        stream(tmp_path / "missing.parquet")


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(_arrow_schema(True, []).empty_table(), path)
    with pytest.raises(DataError, match=f"empty dataset: {esc(path)} holds 0 rows"):
        stream(path)


def test_missing_column_names_column_and_file(dataset, tmp_path):
    path, _ = dataset
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["text_embedding_shape"]), bad)
    with pytest.raises(DataError, match=f"{esc(bad)}: required column 'text_embedding_shape' is missing"):
        stream(bad)


def test_text_only_data_when_latents_are_required(tmp_path):
    path = tmp_path / "text.parquet"
    write_parquet(path, make_samples(4, latents=False))
    with pytest.raises(DataError, match=f"{esc(path)}: required column 'vae_latent_bytes' is missing"):
        stream(path)


def test_mixed_text_only_and_latent_files(tmp_path):
    write_parquet(tmp_path / "a.parquet", make_samples(4))
    write_parquet(tmp_path / "b.parquet", make_samples(4, latents=False))
    with pytest.raises(DataError, match="b.parquet has no 'vae_latent_bytes'"):
        stream(tmp_path, require_latents=False)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_wrong_latent_channels_names_file_and_row(tmp_path, prefetch):
    samples = make_samples(8)
    samples[5]["latent"] = torch.zeros(8, 2, 4, 4, dtype=torch.bfloat16)
    path = tmp_path / "d.parquet"
    write_parquet(path, samples, row_group_size=4)
    # every row's shape is scanned at start-up: found before any batch, whichever row group it is in
    with pytest.raises(DataError, match=f"{esc(path)} row 5: latent has 8 channels, expected 16"):
        stream(path, batch_size=1, shuffle=False, expected_latent_channels=16, prefetch=prefetch)
    # a file whose footer does not record shapes (FastVideo's): the shape column is read instead
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(None), path)
    with pytest.raises(DataError, match=f"{esc(path)} row 5: latent has 8 channels, expected 16"):
        stream(path, expected_latent_channels=16, prefetch=prefetch)
    assert not prefetch_threads()


def test_text_longer_than_max_length(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, make_samples(8))  # lengths 1..8
    with pytest.raises(
        DataError, match=f"{esc(path)} row 7 \\(id 's007'\\): text embedding has 8 tokens, more than text_max_length=7"
    ):
        stream(path, text_max_length=7)


def test_latent_dtypes_differ_within_a_batch(tmp_path):
    samples = make_samples(4)
    samples[1]["latent"] = samples[1]["latent"].float()
    path = tmp_path / "d.parquet"
    write_parquet(path, samples)
    with pytest.raises(DataError, match=f"latent dtypes differ within a batch: {esc(path)} row 0 .* {esc(path)} row 1"):
        next(iter(stream(path, shuffle=False)))


def test_fewer_samples_than_one_global_batch(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, make_samples(5))
    with pytest.raises(
        DataError, match=f"{esc(path)}: 5 samples are fewer than one global batch of 3 per rank x 2 rank\\(s\\)"
    ):
        stream(path, batch_size=3, world_size=2)


def test_two_ranks_see_what_one_rank_with_twice_the_batch_sees(tmp_path):
    """World-size invariance: the global batch at every step is the same set of samples,
    and a position saved with one world size resumes with another."""
    write_parquet(tmp_path / "d.parquet", make_samples(20), row_group_size=4)
    one = stream(tmp_path / "d.parquet", batch_size=4)
    two = [stream(tmp_path / "d.parquet", batch_size=2, rank=r, world_size=2) for r in range(2)]
    it1, it2 = iter(one), [iter(r) for r in two]
    for _ in range(7):  # crosses an epoch boundary (5 global batches per epoch)
        single = ids_of([next(it1)])
        split = ids_of([next(it2[0])]) + ids_of([next(it2[1])])
        assert single == split
    resumed = [stream(tmp_path / "d.parquet", batch_size=2, rank=r, world_size=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(one.state_dict())
    assert ids_of([next(iter(one))]) == ids_of([next(iter(resumed[0]))]) + ids_of([next(iter(resumed[1]))])


def test_sample_keys_name_each_sample_by_epoch_and_row(tmp_path):
    write_parquet(tmp_path / "t.parquet", make_samples(8))
    s = stream(tmp_path / "t.parquet", batch_size=2, world_size=2, rank=1)
    it = iter(s)
    keys = [next(it)["sample_keys"] for _ in range(4)]  # 2 batches per epoch on this rank
    assert [[e for e, _ in k] for k in keys] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert [r for k in keys[:2] for _, r in k] == s.epoch_plan(0).rows[:, 2:].reshape(-1).tolist()


# -- extra tensor columns -------------------------------------------------------------------


def with_extra(samples, seed=1):
    """Give each sample a bf16 'first_frame' [16, 1, 4, 4] and an int64 'mask' [3]."""
    g = torch.Generator().manual_seed(seed)
    for i, s in enumerate(samples):
        s["tensors"] = {
            "first_frame": torch.randn(16, 1, 4, 4, generator=g).to(torch.bfloat16),
            "mask": torch.tensor([i, 1, 0]),
        }
    return samples


def test_extra_tensor_columns_are_stacked_in_their_stored_dtype(tmp_path):
    samples = with_extra(make_samples(6))
    write_parquet(tmp_path / "d.parquet", samples, row_group_size=4)
    names = pq.ParquetFile(tmp_path / "d.parquet").schema_arrow.names
    assert {"first_frame_bytes", "first_frame_shape", "first_frame_dtype", "mask_bytes"} <= set(names)
    by_id = {s["id"]: s for s in samples}
    s = stream(tmp_path / "d.parquet", batch_size=3, extra_tensor_columns=["first_frame", "mask"])
    for batch in take(s, 3):
        assert batch["first_frame"].shape == (3, 16, 1, 4, 4) and batch["first_frame"].dtype == torch.bfloat16
        assert batch["mask"].dtype == torch.int64
        for i, sid in enumerate(batch["ids"]):
            assert torch.equal(batch["first_frame"][i], by_id[sid]["tensors"]["first_frame"])
            assert torch.equal(batch["mask"][i], by_id[sid]["tensors"]["mask"])
    assert "mask" not in next(iter(stream(tmp_path / "d.parquet")))  # only what is asked for


def test_write_tensor_columns_round_trip():
    from accel_distill.data import read_tensor_columns, tensor_columns, write_tensor_columns

    t = torch.randn(2, 3).to(torch.bfloat16)
    row = write_tensor_columns({"id": "x"}, "clip_embed", t)
    assert set(row) == {"id", *tensor_columns("clip_embed")} and row["clip_embed_dtype"] == "bfloat16"
    assert torch.equal(read_tensor_columns(row, "clip_embed"), t)


def test_missing_extra_tensor_column_names_file_and_column(tmp_path):
    write_parquet(tmp_path / "a.parquet", with_extra(make_samples(4)))
    write_parquet(tmp_path / "b.parquet", make_samples(4))
    with pytest.raises(DataError, match=f"{esc(tmp_path / 'b.parquet')}: column 'mask_bytes' is missing"):
        stream(tmp_path, extra_tensor_columns=["mask"])


def test_null_or_mismatched_extra_tensor_names_the_row(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, with_extra(make_samples(4)))
    table = pq.read_table(path)
    shapes = table.column("mask_shape").to_pylist()
    shapes[3] = None
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("mask_shape"), "mask_shape", pa.array(shapes)), bad)
    with pytest.raises(DataError, match=f"{esc(bad)} row 3 \\(id 's003'\\): 'mask' is missing"):
        stream(bad, extra_tensor_columns=["mask"])  # in the first row group: found at start-up
    samples = with_extra(make_samples(4))
    samples[1]["tensors"]["mask"] = torch.tensor([1, 2])
    write_parquet(path, samples)
    with pytest.raises(DataError, match="'mask' differs within a batch: .*row 0 .* row 1"):
        next(iter(stream(path, shuffle=False, extra_tensor_columns=["mask"])))


@pytest.mark.parametrize("name", ["latents", "ids", "vae_latent"])
def test_extra_tensor_names_cannot_shadow_batch_keys(dataset, name):
    with pytest.raises(ValueError, match="not a usable name"):
        stream(dataset[0], extra_tensor_columns=[name])
