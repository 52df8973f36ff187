"""Tests of train/data.py: sampling, batch contract, masks/availability, errors."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from store import synth
from store.schema import FeatureSpec, ItemRecord, Status
from train.data import DataError, StoreData, fallback_split, pool_steps
from train.models import create_model
from train.models._api import model_features
from train.models.mee import masked_pool


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("data") / "d.zarr")
    synth.generate(
        url, items=40, captions_per_item=3, missing={"dlib_face": 0.5, "vggish": 0.3}, images=50, seed=11, small=True
    )
    return url


@pytest.fixture(scope="module")
def store(store_url):
    from store.zarr_store import FeatureStore

    return FeatureStore.open(store_url)


@pytest.fixture(scope="module")
def mee(store, store_url):
    return StoreData(store, "mee")


def test_image_rate_counts(mee, store):
    videos, images = mee.train_items()
    assert len(videos) == 32 and len(images) == 50
    kind = np.asarray(store.items().kind).astype(str)
    for rate, n_img in ((0.5, 16), (0.0, 0), (1.0, 32), (5.0, 50)):
        rows, _ = mee.epoch_pairs(epoch=0, seed=1, image_rate=rate)
        assert len(rows) == 32 + n_img
        assert (kind[rows] == "image").sum() == n_img
        assert set(videos) <= set(rows)  # every train video every epoch
    a, _ = mee.epoch_pairs(0, 1, 0.5)
    b, _ = mee.epoch_pairs(1, 1, 0.5)
    assert set(a[kind[a] == "image"]) != set(b[kind[b] == "image"])  # fresh random images per epoch


def test_one_caption_per_item_per_epoch(mee, store):
    cap_item = np.asarray(store.captions().item)
    seen: dict[int, set[int]] = {}
    for epoch in range(6):
        rows, caps = mee.epoch_pairs(epoch, seed=2, image_rate=0.5)
        assert len(np.unique(rows)) == len(rows)  # each item once
        assert (cap_item[caps] == rows).all()  # caption belongs to its item
        for r, c in zip(rows, caps):
            seen.setdefault(int(r), set()).add(int(c))
    assert max(len(s) for s in seen.values()) > 1  # captions are redrawn each epoch
    r1, c1 = mee.epoch_pairs(3, seed=2, image_rate=0.5)
    r2, c2 = mee.epoch_pairs(3, seed=2, image_rate=0.5)
    assert (r1 == r2).all() and (c1 == c2).all()  # deterministic in (seed, epoch)


def test_train_batches_cover_epoch(mee):
    batches = list(mee.train_batches(epoch=0, seed=1, batch_size=10, image_rate=0.5))
    assert len(batches) == mee.n_train_batches(10, 0.5) == 5  # 48 pairs -> 10,10,10,10,8
    assert sum(len(t["words"]) for t, _ in batches) == 48
    # a trailing batch of one pair is dropped
    assert mee.n_train_batches(47, 0.5) == 1 and len(list(mee.train_batches(0, 1, 47, 0.5))) == 1


def test_video_batch_contract(mee, store):
    rows = np.arange(store.n_items)
    rows = rows[np.isin(rows, np.concatenate(mee.train_items()))][:40]
    v = StoreData(store, dataclasses.replace(model_features("mee"), pooled=())).video_batch(rows)  # every step
    spec = synth.feature_specs(small=True)
    for name in ("resnet152", "i3d_flow", "vggish", "dlib_face"):
        s = spec[name]
        steps = s.max_steps * max(s.slots, 1)
        assert v[name].shape == (len(rows), steps, s.dim) and v[name].dtype == torch.float32
        assert v[f"{name}_mask"].shape == (len(rows), steps) and v[f"{name}_mask"].dtype == torch.bool
        ok = torch.from_numpy(np.asarray(store.status(name))[rows] == Status.OK)
        assert torch.equal(v[f"{name}_avail"], ok)
        assert not v[f"{name}_mask"][~ok].any() and (v[name][~ok] == 0).all()
        assert (v[name][~v[f"{name}_mask"]] == 0).all()
    fb = store.read("dlib_face", rows)
    expect = (fb.slot_mask & fb.mask[:, :, None]).reshape(len(rows), -1)
    assert torch.equal(v["dlib_face_mask"], torch.from_numpy(expect))
    ok = np.flatnonzero(fb.available)[0]
    np.testing.assert_allclose(v["dlib_face"][ok].numpy(), (fb.values[ok] * fb.slot_mask[ok][..., None]).reshape(-1, 64))
    kind = np.asarray(store.items().kind).astype(str)[rows]
    assert not v["i3d_flow_avail"][torch.from_numpy(kind == "image")].any()  # images lack motion


@pytest.mark.parametrize("zero_fill", [False, True])
@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_pooled_features_equal_the_models_pooling(store, zero_fill, cache_bytes):
    """MEE's max-pooled features come pooled when read; the model's video embeddings are those of the full steps."""
    needs = model_features("mee")
    assert dict(needs.pooled) == {"resnet152": "max", "i3d_flow": "max", "dlib_face": "max"}  # vggish: NetVLAD
    pooled = StoreData(store, needs, zero_fill_missing=zero_fill, cache_bytes=cache_bytes)
    full = StoreData(store, dataclasses.replace(needs, pooled=()), zero_fill_missing=zero_fill, cache_bytes=cache_bytes)
    rows = np.array([5, 0, 33, 5, 12, 41, 2, 60])
    p, f = pooled.video_batch(rows), full.video_batch(rows)
    for name in ("resnet152", "i3d_flow", "dlib_face"):
        assert p[name].shape == (len(rows), 1, f[name].shape[2]) and p[name].dtype == torch.float32
        assert torch.equal(p[f"{name}_mask"][:, 0], f[f"{name}_mask"].any(1))
        assert torch.equal(p[f"{name}_avail"], f[f"{name}_avail"])
        assert torch.equal(p[name][:, 0], masked_pool(f[name], f[f"{name}_mask"], "max"))  # exact
    assert torch.equal(p["vggish"], f["vggish"])
    torch.manual_seed(0)
    model = create_model("mee", specs=full.specs()).eval()
    with torch.no_grad():
        a, b = model.encode_video(p), model.encode_video(f)
    assert all(torch.equal(a[k], b[k]) for k in a)
    values, mask = np.array([[[1.0, -2.0], [3.0, -4.0], [9.0, 9.0]], [[7.0, 7.0], [0.0, 0.0], [0.0, 0.0]]]), np.array(
        [[True, True, False], [False, False, False]])
    mean, valid = pool_steps(values, mask, "mean")
    assert mean[:, 0].tolist() == [[2.0, -3.0], [0.0, 0.0]] and valid[:, 0].tolist() == [True, False]


def test_text_batches(mee, store, store_url):
    caps = np.array([0, 5, 7])
    t = mee.text_batch(caps)
    g = store.read("glove", caps)
    assert set(t) == {"words", "words_mask"}
    assert t["words"].shape == (3, 30, 50)
    assert torch.equal(t["words_mask"], torch.from_numpy(np.asarray(g.mask, dtype=bool)))
    tm = StoreData(store, "tmass").text_batch(caps)
    assert set(tm) == {"clip_text"} and tm["clip_text"].shape == (3, 64)
    np.testing.assert_allclose(tm["clip_text"].numpy(), store.read("clip_text", caps).values[:, 0])


def test_cache_and_per_batch_reads_agree(store, store_url, mee):
    lazy = StoreData(store, "mee", cache_bytes=0)
    assert all(src.cached for src in mee.video.values()) and not any(src.cached for src in lazy.video.values())
    rows = np.array([3, 1, 3, 45, 0])
    a, b = mee.video_batch(rows), lazy.video_batch(rows)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(mee.text_batch(rows)["words"], lazy.text_batch(rows)["words"])


def test_zero_fill_missing(store, store_url):
    zf = StoreData(store, "mee", zero_fill_missing=True)
    rows = np.flatnonzero(np.asarray(store.status("dlib_face")) == Status.ABSENT)[:4]
    v = zf.video_batch(rows)
    assert v["dlib_face_avail"].all()
    assert (v["dlib_face"] == 0).all()
    assert v["dlib_face_mask"][:, 0].all() and not v["dlib_face_mask"][:, 1:].any()


def test_eval_set_queries_all_captions(mee, store):
    es = mee.eval_set("test")
    split = np.asarray(store.items().split).astype(str)
    assert (split[es.items] == "test").all() and len(es.items) == 4
    assert len(es.captions) == 3 * len(es.items)  # every caption is a query
    cap_item = np.asarray(store.captions().item)
    assert (es.items[es.query_item] == cap_item[es.captions]).all()


def test_missing_features_error(tmp_path):
    from store.zarr_store import FeatureStore

    url = str(tmp_path / "partial.zarr")
    st = FeatureStore.create(url, [ItemRecord("a", "a.mp4", split="train")])
    st.ensure_feature(FeatureSpec("clip", 8, 12, dtype="float32", modality="clip"), {"weights": {"random": True, "seed": 0}})
    with pytest.raises(DataError) as exc:
        StoreData(FeatureStore.open(url), "mee")
    msg = str(exc.value)
    assert "resnet152, i3d_flow, vggish, dlib_face, glove" in msg
    assert f"tvr-extract SOURCE --store {url} --features resnet152,i3d_flow,vggish,dlib_face,glove" in msg
    with pytest.raises(DataError, match="clip_text"):
        StoreData(FeatureStore.open(url), "tmass")


def test_no_split_fallback(tmp_path):
    from store.zarr_store import FeatureStore

    url = str(tmp_path / "nosplit.zarr")
    synth.generate(url, items=60, captions_per_item=1, splits=None, small=True, seed=2)
    with pytest.warns(UserWarning, match="80/10/10"):
        data = StoreData(FeatureStore.open(url), "tmass")
    ids = np.asarray(FeatureStore.open(url).items().id).astype(str)
    assert list(data.split) == [fallback_split(i) for i in ids]
    assert 35 <= (data.split == "train").sum() <= 57 and set(data.split) <= {"train", "val", "test"}
    assert fallback_split("abc") == fallback_split("abc") and fallback_split("x", "image") == "train"


def test_empty_eval_split_error(tmp_path):
    from store.zarr_store import FeatureStore

    url = str(tmp_path / "noval.zarr")
    synth.generate(url, items=6, captions_per_item=1, splits=(1.0, 0.0, 0.0), small=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = StoreData(FeatureStore.open(url), "mee")
    with pytest.raises(DataError, match="split 'val' has no videos"):
        data.eval_set("val")


def test_mee_without_some_experts(tmp_path):
    """MEE trains on the experts a store has (with a warning naming the rest); the text feature stays required."""
    import shutil

    from store.zarr_store import FeatureStore
    from train.config import build_config
    from train.engine import build_model

    url = str(tmp_path / "noface.zarr")
    synth.generate(url, items=12, captions_per_item=1, small=True, seed=3)
    shutil.rmtree(tmp_path / "noface.zarr" / "dlib_face")
    shutil.rmtree(tmp_path / "noface.zarr" / "vggish")
    st = FeatureStore.open(url)
    assert "dlib_face" not in st.features
    with pytest.warns(UserWarning, match="lacks video feature.*vggish, dlib_face.*--features vggish,dlib_face"):
        data = StoreData(st, "mee")
    assert data.video_features == ("resnet152", "i3d_flow")
    model = build_model(build_config("mee"), data)
    assert model.modalities == ("appearance", "motion")
    rows, caps = data.epoch_pairs(0, 0, 0.0)
    loss, _ = model.loss(model.encode_text(data.text_batch(caps[:4])), model.encode_video(data.video_batch(rows[:4])))
    assert torch.isfinite(loss)
    shutil.rmtree(tmp_path / "noface.zarr" / "glove")
    with pytest.raises(DataError, match="lacks feature.*glove"):
        StoreData(FeatureStore.open(url), "mee")


# ---- features declared by the models; sampling modes (issue 11 §5, §6) ----------------------------------------
def test_features_come_from_the_model_config(store, store_url):
    from train.models import model_features

    assert model_features("mee").video == ("resnet152", "i3d_flow", "vggish", "dlib_face")
    assert model_features("xpool", {"frames_feature": "clip_l", "text_feature": "clip_l_text"}).text == "clip_l_text"
    data = StoreData(store, "mee", model_config={"modalities": {"appearance": "resnet152"}})
    assert data.video_features == ("resnet152",) and set(data.video) == {"resnet152"}
    with pytest.raises(DataError, match="lacks feature.*word2vec"):  # names what the config asks for
        StoreData(store, "mee", model_config={"text_feature": "word2vec"})


def _all_usable_pairs(data, rows):
    return {(int(data.caption_item[c]), int(c)) for c in data.captions_of(rows)}


def test_all_pairs_sampling_covers_every_pair_once(mee, store):
    videos, images = mee.train_items()
    rows, caps = mee.epoch_pairs(0, seed=1, image_rate=0.0, sampling="all_pairs")
    pairs = list(zip(rows.tolist(), caps.tolist()))
    assert len(pairs) == len(set(pairs)) == 3 * len(videos)  # 3 captions per video, each once
    cap_item = np.asarray(store.captions().item)
    expect = {(int(cap_item[c]), int(c)) for c in np.flatnonzero(np.isin(cap_item, videos))}
    assert set(pairs) == expect == _all_usable_pairs(mee, videos)
    r2, c2 = mee.epoch_pairs(0, seed=1, image_rate=0.0, sampling="all_pairs")
    assert (r2 == rows).all() and (c2 == caps).all()  # deterministic in (seed, epoch)
    r3, _ = mee.epoch_pairs(1, seed=1, image_rate=0.0, sampling="all_pairs")
    assert not (r3 == rows).all()  # reshuffled per epoch
    # images at rate alpha of the video pairs
    rows, caps = mee.epoch_pairs(0, seed=1, image_rate=0.5, sampling="all_pairs")
    kind = np.asarray(store.items().kind).astype(str)
    assert (kind[rows] == "image").sum() == int(0.5 * 3 * len(videos)) and (cap_item[caps] == rows).all()
    assert mee.n_pairs(0.5, "all_pairs") == len(rows) == 3 * len(videos) + int(0.5 * 3 * len(videos))
    assert mee.n_train_batches(10, 0.5, "all_pairs") == len(list(mee.train_batches(0, 1, 10, 0.5, "all_pairs")))
    with pytest.raises(ValueError, match="sampling"):
        mee.epoch_pairs(0, 1, 0.0, sampling="random")


def test_drop_last(mee):
    # 48 pairs at batch 10: 10,10,10,10,8 kept; with drop_last the partial batch of 8 goes
    batches = list(mee.train_batches(0, 1, 10, 0.5, drop_last=True))
    assert len(batches) == mee.n_train_batches(10, 0.5, drop_last=True) == 4
    assert all(len(t["words"]) == 10 for t, _ in batches)
    assert mee.n_train_batches(48, 0.5, drop_last=True) == 1 and mee.n_train_batches(49, 0.5, drop_last=True) == 0


def test_nonfinite_rows_are_named_on_load(tmp_path):
    import zarr

    from store.zarr_store import FeatureStore

    url = str(tmp_path / "nan.zarr")
    synth.generate(url, items=10, captions_per_item=1, small=True, seed=5)
    arr = zarr.open_group(url, mode="r+")["resnet152"]["values"]
    block = np.asarray(arr[4:5])
    block[0, 0, 3] = np.inf  # one value at a valid step (the store itself reports NaN in an OK row as lost data)
    arr[4:5] = block
    ids = np.asarray(FeatureStore.open(url).items().id).astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=f"'resnet152'.*NaN/inf.*{ids[4]}"):
            StoreData(FeatureStore.open(url), "mee")
        lazy = StoreData(FeatureStore.open(url), "mee", cache_bytes=0)  # read per batch: checked there
    with pytest.raises(DataError, match=f"{ids[4]}"):
        lazy.video_batch(np.array([3, 4]))
    lazy.video_batch(np.array([3, 5]))  # other rows are fine
