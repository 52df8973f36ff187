"""Tests of the synthetic store generator (store/synth.py, `tvr-store synth`)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from store import FeatureStore, synth
from store.schema import Status

MISSING = {"dlib_face": 0.5, "vggish": 0.2}


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory):
    """A small store: 150 videos, 20 images, 2 captions each, faces/audio missing, multiple choice."""
    url = str(tmp_path_factory.mktemp("synth") / "s.zarr")
    return url, synth.generate(
        url, items=150, captions_per_item=2, missing=MISSING, images=20, seed=3, small=True, choices=4
    )


def test_schema_features_and_provenance(synth_store):
    from store.zarr_store import FeatureStore

    url, _ = synth_store
    store = FeatureStore.open(url)
    specs = synth.feature_specs(small=True)
    assert set(store.features) == set(specs)
    for name, spec in specs.items():
        assert store.spec(name) == spec
        assert store.provenance(name)["weights"] == {"synthetic": True, "random": True, "seed": 3}
    assert store.n_items == 170 and store.n_captions == 340
    assert store.spec("dlib_face").slots == 4 and store.spec("glove").max_steps == 30
    assert store.spec("clip").dtype == "float32" and store.spec("clip").max_steps == 12
    real = synth.feature_specs(small=False)
    assert {n: s.dim for n, s in real.items()} == {
        "resnet152": 2048, "i3d_flow": 1024, "vggish": 128, "dlib_face": 128, "clip": 512, "clip_text": 512, "glove": 50,
    }


def test_splits_and_kinds(synth_store):
    _, store = synth_store
    items = store.items()
    kind, split = np.asarray(items.kind).astype(str), np.asarray(items.split).astype(str)
    assert (kind[:150] == "video").all() and (kind[150:] == "image").all()
    assert {s: int((split[:150] == s).sum()) for s in ("train", "val", "test")} == {"train": 120, "val": 15, "test": 15}
    assert (split[150:] == "train").all()
    caps = store.captions()
    assert np.bincount(np.asarray(caps.item), minlength=170).tolist() == [2] * 170


def test_absent_patterns(synth_store):
    _, store = synth_store
    kind = np.asarray(store.items().kind).astype(str)
    video, image = kind == "video", kind == "image"
    for name, rate, reason in (("dlib_face", 0.5, "no_face"), ("vggish", 0.2, "no_audio")):
        st = np.asarray(store.status(name))
        absent = st[video] == Status.ABSENT
        assert abs(absent.mean() - rate) < 0.12, (name, absent.mean())
        assert set(np.asarray(store.reasons(name))[video][absent]) == {reason}
    for name, reason in (("i3d_flow", "no_motion"), ("vggish", "no_audio")):
        st = np.asarray(store.status(name))
        assert (st[image] == Status.ABSENT).all()
        assert set(np.asarray(store.reasons(name))[image]) == {reason}
    assert (np.asarray(store.status("i3d_flow"))[video] == Status.OK).all()
    for name in ("resnet152", "clip", "glove", "clip_text"):
        assert (np.asarray(store.status(name)) == Status.OK).all()


def test_steps_masks_and_scale(synth_store):
    _, store = synth_store
    kind = np.asarray(store.items().kind).astype(str)
    img, vid = np.flatnonzero(kind == "image")[:5], np.flatnonzero(kind == "video")[:5]
    res_img = store.read("resnet152", img)
    assert (res_img.mask.sum(1) == 1).all()  # images: one step
    clip_vid = store.read("clip", vid)
    assert (clip_vid.mask.sum(1) == 12).all()
    norms = np.linalg.norm(clip_vid.values[clip_vid.mask], axis=-1)
    assert 5 < norms.mean() < 20  # CLIP-like raw norms ~10
    face_ok = np.flatnonzero(np.asarray(store.status("dlib_face")) == Status.OK)[:5]
    faces = store.read("dlib_face", face_ok)
    assert faces.values.shape[2:] == (4, 64)
    assert faces.slot_mask.any(axis=(1, 2)).all()  # at least one face per item with faces
    assert (faces.slot_mask <= faces.mask[:, :, None]).all()
    glove = store.read("glove", np.arange(10))
    n_tok = glove.mask.sum(1)
    assert (n_tok >= 5).all() and (n_tok <= 30).all()
    assert (glove.values[~glove.mask] == 0).all()


def test_captions_correlate_with_their_item(synth_store):
    """Raw clip_text is closer (cosine) to its own item's mean clip frame than to others on average."""
    _, store = synth_store
    caps = store.captions()
    rows = np.arange(0, 300, 2)  # one caption of each of the 150 videos
    t = store.read("clip_text", rows).values[:, 0]
    v = store.read("clip", np.asarray(caps.item)[rows]).values.mean(1)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = t @ v.T
    rank = (sim > np.diag(sim)[:, None]).sum(1)
    assert np.median(rank) < 30  # far better than the random median of ~75
    assert (rank == 0).mean() < 0.9  # ... but not trivially perfect


def test_multiple_choice_set(synth_store):
    url, store = synth_store
    mc = FeatureStore.open(url).choices()  # the set as store rows (store/_choices.py)
    cap_item = np.asarray(store.captions().item)
    items, caps, ans = mc.items, mc.captions, mc.answer
    split = np.asarray(store.items().split).astype(str)
    assert len(items) == 15 and caps.shape == (15, 4)
    assert (split[items] == "test").all()
    assert (cap_item[caps[np.arange(15), ans]] == items).all()
    wrong = np.ones_like(caps, dtype=bool)
    wrong[np.arange(15), ans] = False
    assert (cap_item[caps[wrong].reshape(15, 3)] != items[:, None]).all()


def test_deterministic_per_seed(tmp_path):
    kw = dict(items=12, captions_per_item=2, missing=MISSING, images=3, small=True)
    a = synth.generate(str(tmp_path / "a.zarr"), seed=5, **kw)
    b = synth.generate(str(tmp_path / "b.zarr"), seed=5, **kw)
    c = synth.generate(str(tmp_path / "c.zarr"), seed=6, **kw)
    for name in ("resnet152", "dlib_face", "glove", "clip_text"):
        ra, rb, rc = a.read(name), b.read(name), c.read(name)
        np.testing.assert_array_equal(ra.values, rb.values)
        np.testing.assert_array_equal(np.asarray(a.status(name)), np.asarray(b.status(name)))
        assert not np.array_equal(ra.values, rc.values)
    assert (np.asarray(a.items().split) == np.asarray(b.items().split)).all()


def test_no_splits(tmp_path):
    store = synth.generate(str(tmp_path / "n.zarr"), items=5, captions_per_item=1, splits=None, small=True)
    assert (np.asarray(store.items().split).astype(str) == "").all()


def test_option_parsing_errors():
    assert synth.parse_missing("face=0.5, audio=0.2") == {"dlib_face": 0.5, "vggish": 0.2}
    assert synth.parse_missing("") == {}
    with pytest.raises(ValueError, match="smell"):
        synth.parse_missing("smell=0.1")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        synth.parse_missing("face=1.5")
    assert synth.parse_splits("0.7,0.2,0.1") == (0.7, 0.2, 0.1)
    assert synth.parse_splits("none") is None
    with pytest.raises(ValueError, match="sum"):
        synth.parse_splits("0.5,0.1,0.1")


def test_run_via_argparse(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    out = tmp_path / "cli.zarr"
    args = parser.parse_args([str(out), "--items", "6", "--captions-per-item", "2", "--small", "--missing", "face=1.0"])
    assert synth.run(args) == 0
    from store.zarr_store import FeatureStore

    store = FeatureStore.open(str(out))
    assert store.n_items == 6 and (np.asarray(store.status("dlib_face")) == Status.ABSENT).all()
    assert synth.run(args) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    bad = parser.parse_args([str(tmp_path / "x.zarr"), "--items", "3", "--missing", "nose=0.3"])
    assert synth.run(bad) == 2
    assert "nose" in capsys.readouterr().err


def test_store_cli_synth_subcommand(tmp_path):
    cli = pytest.importorskip("store.cli")
    out = tmp_path / "via_cli.zarr"
    assert cli.main(["synth", str(out), "--items", "4", "--captions-per-item", "1", "--small", "--seed", "1"]) == 0
    from store.zarr_store import FeatureStore

    assert FeatureStore.open(str(out)).n_items == 4
