"""FeatureStore on real Zarr v3 directories: round-trips, validation, write protocol, concurrency, xarray."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from store import (
    SCHEMA_VERSION,
    CaptionRecord,
    ExtraSpec,
    FeatureRows,
    FeatureSpec,
    FeatureStore,
    ItemRecord,
    Status,
    StoreError,
    open_store,
)

ROOT = Path(__file__).resolve().parents[1]
RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
SPEC16 = FeatureSpec("resnet152", dim=6, max_steps=5)
SPEC32 = FeatureSpec("vggish", dim=4, max_steps=3, dtype="float32", modality="audio")
FACE = FeatureSpec("dlib_face", dim=3, max_steps=4, slots=2, modality="face",
                   extras=(ExtraSpec("box", (4,)), ExtraSpec("score", (), "float16")))
TEXT = FeatureSpec("clip_text", dim=4, max_steps=1, dtype="float32", modality="text", axis="caption", chunk_rows=4)


def make_items(n: int, prefix: str = "v") -> list[ItemRecord]:
    return [ItemRecord(f"{prefix}{i}", f"/data/{prefix}{i}.mp4", kind="image" if i % 4 == 3 else "video",
                       duration=0.0 if i % 4 == 3 else 1.5 * i, split=("train", "val", "test", "")[i % 4])
            for i in range(n)]


def make_captions(items: list[ItemRecord], per: int = 2) -> list[CaptionRecord]:
    return [CaptionRecord(f"{it.id}/c{j}", it.id, f"a caption {j} for {it.id} ünïcode") for it in items
            for j in range(per)]


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    items = make_items(6)
    s = FeatureStore.create(tmp_path / "s.zarr", items, make_captions(items))
    for spec in (SPEC16, SPEC32, FACE, TEXT):
        s.ensure_feature(spec, RANDOM)
    return s


def rows(spec: FeatureSpec, n: int, seed: int, **kw: object) -> FeatureRows:
    rng = np.random.default_rng(seed)
    shape = (n, spec.slots, spec.dim) if spec.slots else (n, spec.dim)
    return FeatureRows(Status.OK, rng.standard_normal(shape).astype(np.float32), np.arange(n) * 0.25, **kw)


def test_items_and_captions_round_trip(store: FeatureStore) -> None:
    again = FeatureStore.open(store.url)
    it, cap = again.items(), again.captions()
    assert list(it.id) == [f"v{i}" for i in range(6)] and len(it) == 6
    assert list(it.kind) == ["video", "video", "video", "image", "video", "video"]
    assert list(it.split) == ["train", "val", "test", "", "train", "val"]
    np.testing.assert_array_equal(it.duration, [0.0, 1.5, 3.0, 0.0, 6.0, 7.5])
    assert it.path[2] == "/data/v2.mp4"
    assert len(cap) == 12 and cap.id[3] == "v1/c1" and cap.text[3] == "a caption 1 for v1 ünïcode"
    np.testing.assert_array_equal(cap.item, np.repeat(np.arange(6), 2))
    assert again.row_of("v4") == 4 and again.n_items == 6 and again.n_captions == 12
    assert again.features == ["clip_text", "dlib_face", "resnet152", "vggish"]
    assert again.spec("dlib_face") == FACE
    prov = again.provenance("resnet152")
    assert prov["weights"] == {"random": True, "seed": 0} and prov["preset"] == "test"
    assert "tvr_version" in prov and "created" in prov
    assert zarr.open_group(store.url, mode="r").attrs["tvr_store"] == SCHEMA_VERSION
    with pytest.raises(StoreError, match="'nope' is not in"):
        again.row_of("nope")


@pytest.mark.parametrize("spec", [SPEC16, SPEC32], ids=["float16", "float32"])
def test_values_round_trip_with_padding(store: FeatureStore, spec: FeatureSpec) -> None:
    r = rows(spec, 2, seed=1, mask=np.array([True, False]))
    store.write(spec.name, 3, r)
    store.write(spec.name, 0, rows(spec, spec.max_steps, seed=2))
    b = FeatureStore.open(store.url).read(spec.name, [3, 0, 1])
    assert b.values.dtype == np.float32 and b.values.shape == (3, spec.max_steps, spec.dim)
    tol = 1e-3 if spec.dtype == "float16" else 0
    np.testing.assert_allclose(b.values[0, :2], r.values, atol=tol * 4, rtol=tol)
    assert not b.values[0, 2:].any() and not b.values[2].any()
    np.testing.assert_array_equal(b.mask[0], [True, False] + [False] * (spec.max_steps - 2))
    np.testing.assert_array_equal(b.time[0, :2], [0.0, 0.25])
    assert np.isnan(b.time[0, 2:]).all() and np.isnan(b.time[2]).all()
    np.testing.assert_array_equal(b.available, [True, True, False])
    assert b.mask[1].all() and not b.mask[2].any()
    np.testing.assert_array_equal(b.rows, [3, 0, 1])
    values = zarr.open_array(f"{store.url}/{spec.name}/values", mode="r")
    assert values.dtype == np.dtype(spec.dtype) and values.compressors == ()  # raw floats: streamed without a decode
    assert zarr.open_array(f"{store.url}/{spec.name}/status", mode="r").compressors == ()  # raw: fast scans


def test_slots_and_extras_round_trip(store: FeatureStore) -> None:
    sm = np.array([[True, False], [True, True], [False, False]])
    box = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    score = np.full((3, 2), 0.5, dtype=np.float16)
    r = rows(FACE, 3, seed=3, slot_mask=sm, extras={"box": box, "score": score})
    store.write("dlib_face", 2, r)
    b = store.read("dlib_face")
    assert b.values.shape == (6, 4, 2, 3) and b.slot_mask.shape == (6, 4, 2)
    np.testing.assert_allclose(b.values[2, :3], r.values, atol=5e-3)
    np.testing.assert_array_equal(b.slot_mask[2, :3], sm)
    assert not b.slot_mask[2, 3:].any() and not b.slot_mask[0].any()
    np.testing.assert_array_equal(b.extras["box"][2, :3], box)
    assert b.extras["box"].shape == (6, 4, 2, 4) and b.extras["score"].dtype == np.float16
    np.testing.assert_array_equal(b.extras["score"][2, :3], score)


def test_absent_failed_reasons_and_coverage(store: FeatureStore) -> None:
    store.write("vggish", 3, FeatureRows.absent(SPEC32, "no_audio", "image has no audio"))
    store.write("vggish", 0, rows(SPEC32, 3, seed=4))
    store.write_failed("vggish", 1, "decode_error", "moov atom not found")
    st = store.status("vggish")
    np.testing.assert_array_equal(st, [Status.OK, Status.FAILED, 0, Status.ABSENT, 0, 0])
    assert list(store.reasons("vggish")) == ["", "decode_error", "", "no_audio", "", ""]
    assert list(store.messages("vggish", [1, 3])) == ["moov atom not found", "image has no audio"]
    assert store.coverage()["vggish"] == {"ok": 1, "absent": 1, "failed": 1, "pending": 3}
    b = store.read("vggish", [1, 3])
    assert not b.available.any() and not b.mask.any()
    # a failed row that is retried and succeeds becomes OK with its reason cleared
    store.write("vggish", 1, rows(SPEC32, 1, seed=5))
    assert store.status("vggish")[1] == Status.OK and store.reasons("vggish")[1] == ""


def test_caption_feature_write_block(store: FeatureStore) -> None:
    block = [FeatureRows(Status.OK, np.full((1, 4), float(i)), np.zeros(1)) for i in range(4)]
    store.write_block("clip_text", 4, block)
    store.write_block("clip_text", 8, block)  # last chunk: rows 8..11 (12 captions)
    b = store.read("clip_text")
    np.testing.assert_array_equal(b.available, [False] * 4 + [True] * 8)
    np.testing.assert_array_equal(b.values[4:8, 0, 0], [0, 1, 2, 3])
    with pytest.raises(StoreError, match="whole chunks"):
        store.write_block("clip_text", 2, block)
    with pytest.raises(StoreError, match="whole chunks"):
        store.write_block("clip_text", 0, block[:3])
    with pytest.raises(StoreError, match="write_block"):
        store.write("clip_text", 0, block[0])
    store.write_failed("clip_text", 0, "tokenizer_error")
    np.testing.assert_array_equal(store.status("clip_text")[:4], [Status.FAILED] * 4)


@pytest.mark.parametrize(
    ("spec", "result", "match"),
    [
        (SPEC16, FeatureRows(Status.OK, np.zeros((2, 7)), np.zeros(2)), r"values have shape \(2, 7\)"),
        (SPEC16, FeatureRows(Status.OK, np.zeros((6, 6)), np.zeros(6)), "max_steps=5"),
        (SPEC16, FeatureRows(Status.OK, np.zeros((2, 6)), np.zeros(3)), "times have shape"),
        (SPEC16, FeatureRows(Status.OK, np.zeros((2, 6)), np.zeros(2), mask=np.ones(2)), "mask must be bool"),
        (SPEC16, FeatureRows(Status.OK, np.full((2, 6), np.nan), np.zeros(2)), "NaN"),
        (SPEC16, FeatureRows(Status.OK, np.full((2, 6), 1e6), np.zeros(2)), "overflow float16"),
        (SPEC16, FeatureRows(Status.OK, np.zeros((0, 6)), np.zeros(0)), "at least one step"),
        (SPEC16, FeatureRows(Status.FAILED, np.zeros((0, 6)), np.zeros(0)), "use write_failed"),
        (FACE, FeatureRows(Status.OK, np.zeros((2, 3, 3)), np.zeros(2)), "K=2"),
        (FACE, FeatureRows(Status.OK, np.zeros((2, 2, 3)), np.zeros(2), extras={"box": np.zeros((2, 2, 4))}),
         "extra 'score' is missing"),
        (FACE, FeatureRows(Status.OK, np.zeros((2, 2, 3)), np.zeros(2), slot_mask=np.ones((2, 3), bool)),
         "slot_mask must be"),
        (SPEC16, FeatureRows(Status.OK, np.zeros((2, 6)), np.zeros(2), extras={"box": np.zeros(2)}),
         "unknown extras"),
    ],
)
def test_bad_rows_are_rejected_naming_feature_and_row(store: FeatureStore, spec: FeatureSpec,
                                                      result: FeatureRows, match: str) -> None:
    with pytest.raises(StoreError, match=match) as err:
        store.write(spec.name, 4, result)
    assert f"feature '{spec.name}' row 4" in str(err.value)
    assert store.status(spec.name)[4] == Status.PENDING


def test_record_validation(tmp_path: Path) -> None:
    items = make_items(3)
    with pytest.raises(StoreError, match="duplicate item id 'v1'"):
        FeatureStore.create(tmp_path / "a.zarr", items + [ItemRecord("v1", "/x.mp4")])
    with pytest.raises(StoreError, match="unknown item 'ghost'"):
        FeatureStore.create(tmp_path / "b.zarr", items, [CaptionRecord("c", "ghost", "t")])
    with pytest.raises(StoreError, match="duplicate caption id 'c'"):
        FeatureStore.create(tmp_path / "c.zarr", items, [CaptionRecord("c", "v0", "t")] * 2)
    with pytest.raises(ValueError, match="whitespace"):
        ItemRecord(" v", "/x.mp4")
    s = FeatureStore.create(tmp_path / "d.zarr", items)
    with pytest.raises(StoreError, match="already exists"):
        FeatureStore.create(tmp_path / "d.zarr", items)
    assert FeatureStore.create(tmp_path / "d.zarr", items[:1], overwrite=True).n_items == 1
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a tvr store; refusing to overwrite"):
        FeatureStore.create(tmp_path / "notes", items, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").exists()
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(s.url).ensure_feature(SPEC16, RANDOM)


def test_not_a_store_paths(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="plain directory"):
        FeatureStore.open(tmp_path / "plain")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        FeatureStore.open(tmp_path / "f.txt")
    g = zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    g.create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(StoreError, match="not a tvr store: root attribute 'tvr_store' is missing"):
        open_store(tmp_path / "other.zarr")
    zarr.create_array(str(tmp_path / "arr.zarr"), shape=(2,), dtype="int8")
    with pytest.raises(StoreError, match="not a tvr store"):
        open_store(tmp_path / "arr.zarr")


def test_future_schema_version_refused(store: FeatureStore) -> None:
    zarr.open_group(store.url, mode="r+").attrs["tvr_store"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="newer than this tvr supports.*upgrade tvr"):
        FeatureStore.open(store.url)


def test_pickle_codec_array_refused(store: FeatureStore) -> None:
    import numcodecs
    from zarr.core.dtype import VariableLengthBytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.create_array(zarr.storage.LocalStore(store.url), name="resnet152/evil", shape=(2,), chunks=(2,),
                          dtype=VariableLengthBytes(), zarr_format=2, filters=[numcodecs.Pickle()],
                          compressors=None)
    with pytest.raises(StoreError, match="'resnet152/evil' uses the pickle codec"):
        FeatureStore.open(store.url)


def test_object_dtype_and_stray_root_arrays_refused(tmp_path: Path) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", make_items(2))
    meta = tmp_path / "s.zarr" / "item_path" / "zarr.json"
    good = meta.read_text()
    doc = json.loads(good)
    doc["data_type"] = "object"  # what a foreign writer of Python objects would declare
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="'item_path' has an object data type"):
        FeatureStore.open(s.url)
    meta.write_text(good)
    # schema v2 is sharded itself, so a sharded array is no longer refused as such; a stray one at the root is
    zarr.open_group(s.url, mode="r+").create_array("extra", shape=(4,), chunks=(1,), shards=(4,), dtype="uint8",
                                                   dimension_names=("item",))
    with pytest.raises(StoreError, match="unexpected array 'extra' at the root"):
        FeatureStore.open(s.url)


def test_missing_dimension_names_and_arrays_refused(store: FeatureStore) -> None:
    meta = Path(store.url) / "vggish" / "mask" / "zarr.json"
    original = meta.read_text()
    doc = json.loads(original)
    doc.pop("dimension_names")
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="'vggish/mask' has dimension_names None"):
        FeatureStore.open(store.url)
    meta.write_text(original)
    FeatureStore.open(store.url)  # repaired: opens again
    zarr.open_group(store.url, mode="r+").create_group("stray")
    with pytest.raises(StoreError, match="'stray' lacks the 'spec'"):
        FeatureStore.open(store.url)


def test_ensure_feature_refuses_other_weights_or_layout(store: FeatureStore) -> None:
    s = FeatureStore.open(store.url, "r+")
    s.ensure_feature(SPEC16, RANDOM)  # identical: a no-op
    with pytest.raises(StoreError, match="Mixing weights.*new feature name") as err:
        s.ensure_feature(SPEC16, {"weights": {"file": "resnet152-394f9c45.pth", "sha256": "ab" * 32},
                                  "preset": "test"})
    assert "resnet152-394f9c45.pth" in str(err.value)
    with pytest.raises(StoreError, match="spec.dim: stored 6, this run 7"):
        s.ensure_feature(FeatureSpec("resnet152", dim=7, max_steps=5), RANDOM)
    with pytest.raises(StoreError, match='preset: stored "test", this run "other"'):
        s.ensure_feature(SPEC16, {**RANDOM, "preset": "other"})
    with pytest.raises(StoreError, match="provenance\\['weights'\\]"):
        s.ensure_feature(FeatureSpec("clip", dim=4, max_steps=2), {"preset": "x"})
    with pytest.raises(StoreError, match="collides"):
        s.ensure_feature(FeatureSpec("item_id", dim=4, max_steps=2), RANDOM)


@pytest.mark.parametrize("change, message", [
    ({"max_steps": 6}, "spec.max_steps: stored 5, this run 6"),
    ({"dtype": "float32"}, "spec.dtype: stored 'float16', this run 'float32'"),
    ({"slots": 2}, "spec.slots: stored 0, this run 2"),
    ({"extras": (ExtraSpec("box", (4,)),)}, r"spec.extras: stored \(\), this run \(\{'name': 'box', 'shape': \(4,\)"),
])
def test_ensure_feature_refuses_any_other_spec_naming_both_values(tmp_path: Path, change: dict[str, Any],
                                                                  message: str) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", make_items(2))
    s.ensure_feature(SPEC16, RANDOM)
    with pytest.raises(StoreError, match=message):
        s.ensure_feature(dataclasses.replace(SPEC16, **change), RANDOM)


def test_ensure_feature_refuses_other_value_changing_provenance(tmp_path: Path) -> None:
    prov = {**RANDOM, "variant": "a", "options": {"fps": 2, "dlib_use_cuda": False}, "decode": {"height": 224}}
    s = FeatureStore.create(tmp_path / "s.zarr", make_items(2))
    s.ensure_feature(SPEC16, prov)
    again = FeatureStore.open(s.url, "r+")
    again.ensure_feature(SPEC16, {**prov, "tvr_version": "9.9", "weights_url": "https://elsewhere/w.pth",
                                  "options": {"fps": 2, "dlib_use_cuda": True}})  # bookkeeping only: accepted
    for change, message in (({"options": {"fps": 1}}, "options.fps: stored 2, this run 1"),
                            ({"options": {"fps": 2, "precision": "bf16"}},
                             'options.precision: stored "\\(not recorded\\)", this run "bf16"'),
                            ({"decode": {"height": 256}}, "decode.height: stored 224, this run 256"),
                            ({"variant": "b"}, 'variant: stored "a", this run "b"')):
        with pytest.raises(StoreError, match=message):
            again.ensure_feature(SPEC16, {**prov, **change})
    old = FeatureStore.create(tmp_path / "old.zarr", make_items(2))
    old.ensure_feature(SPEC16, RANDOM)  # a group from before options/decode were recorded
    old.ensure_feature(SPEC16, prov)  # not compared here: the caller (pipelines/rerun.py) knows the old defaults


def test_add_items_extends_every_feature(store: FeatureStore) -> None:
    store.write("resnet152", 5, rows(SPEC16, 2, seed=6))
    full = [FeatureRows(Status.OK, np.full((1, 4), float(i)), np.zeros(1)) for i in range(4)]
    for start in (0, 4, 8):
        store.write_block("clip_text", start, full)
    new = make_items(3, prefix="w")
    s = FeatureStore.open(store.url, "r+")
    s.add_items(new, make_captions(new, per=1) + [CaptionRecord("v0/extra", "v0", "old item, new caption")])
    with pytest.raises(StoreError, match="duplicate item id 'w1'"):
        s.add_items([ItemRecord("w1", "/x")])
    with pytest.raises(StoreError, match="duplicate caption id 'v0/c0'"):
        s.add_items([], [CaptionRecord("v0/c0", "v0", "again")])
    again = FeatureStore.open(store.url)
    assert again.n_items == 9 and again.n_captions == 16 and again.row_of("w2") == 8
    assert list(again.captions().item[12:]) == [6, 7, 8, 0]
    cov = again.coverage()
    assert cov["resnet152"] == {"ok": 1, "absent": 0, "failed": 0, "pending": 8}
    assert cov["clip_text"] == {"ok": 12, "absent": 0, "failed": 0, "pending": 4}
    np.testing.assert_allclose(again.read("resnet152", [5]).values[0, :2], rows(SPEC16, 2, seed=6).values,
                               atol=5e-3)
    assert again.read("dlib_face").values.shape == (9, 4, 2, 3)
    s.write("resnet152", 8, rows(SPEC16, 1, seed=7))
    assert FeatureStore.open(store.url).status("resnet152")[8] == Status.OK


_CHILD = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from store import FeatureStore, FeatureRows, Status
s = FeatureStore.open({url!r}, "r+")
for row in range({first}, {n}, 2):
    rng = np.random.default_rng(row)
    s.write("resnet152", row, FeatureRows(Status.OK, rng.standard_normal((row % 5 + 1, 6)), np.arange(row % 5 + 1)))
"""


def test_two_processes_write_disjoint_rows(tmp_path: Path) -> None:
    n = 24
    s = FeatureStore.create(tmp_path / "s.zarr", make_items(n))
    s.ensure_feature(SPEC16, RANDOM)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT), url=s.url, first=k, n=n)])
             for k in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    b = FeatureStore.open(s.url).read("resnet152")
    assert b.available.all()
    for row in range(n):
        want = np.random.default_rng(row).standard_normal((row % 5 + 1, 6)).astype(np.float16)
        np.testing.assert_array_equal(b.values[row, : row % 5 + 1], want.astype(np.float32))
        assert b.mask[row].sum() == row % 5 + 1


_CRASH = """
import os, sys, numpy as np
sys.path.insert(0, {root!r})
import store._segment as seg
from store import FeatureStore, FeatureRows, Status
s = FeatureStore.open({url!r}, "r+")
s.write("resnet152", 0, FeatureRows(Status.OK, np.full((3, 6), 5.0), np.arange(3)))  # a finished row ...
real = seg.os.writev
def dying(fd, bufs):
    whole = b"".join(bytes(b) for b in bufs)
    real(fd, [whole[:{cut}]])
    os._exit(17)  # ... then the process dies {cut} bytes into appending the next record to the same segment
seg.os.writev = dying
s.write("resnet152", {row}, FeatureRows(Status.OK, np.full((3, 6), 7.0), np.arange(3)))
"""


@pytest.mark.parametrize("cut", [20, 200])  # inside the record's prefix, inside its body
@pytest.mark.parametrize("rewrite", [True, False], ids=["rewrite_of_ok_row", "fresh_row"])
def test_writer_killed_mid_append_leaves_row_unchanged(store: FeatureStore, rewrite: bool, cut: int) -> None:
    if rewrite:
        store.write("resnet152", 1, rows(SPEC16, 2, seed=8))  # an earlier successful run of the same row
        assert store.status("resnet152")[1] == Status.OK
    proc = subprocess.run([sys.executable, "-c", _CRASH.format(root=str(ROOT), url=store.url, row=1, cut=cut)],
                          timeout=120)
    assert proc.returncode == 17
    segs = sorted((Path(store.url) / ".tvr" / "staging" / "resnet152" / "0").glob("*.seg"))
    assert len(segs) == 1 + rewrite  # the dead writer's segment ends in a truncated record ...
    s = FeatureStore.open(store.url)  # ... which is never taken for a row; the record before it counts
    want = Status.OK if rewrite else Status.PENDING
    assert list(s.status("resnet152")[:2]) == [Status.OK, want]
    b = s.read("resnet152", [0, 1])
    assert b.available[1] == rewrite and not (b.values == 7.0).any() and (b.values[0, :3] == 5.0).all()
    assert s.staged_count("resnet152") == 1 + rewrite
    w = FeatureStore.open(store.url, "r+")
    w.write("resnet152", 2, rows(SPEC16, 2, seed=3))  # a new writer: its own segment, never after the torn tail
    w.pack_ready(partial=True)
    got = FeatureStore.open(store.url)
    assert list(got.status("resnet152")[:3]) == [Status.OK, want, Status.OK] and got.staged_count("resnet152") == 0
    assert not (Path(store.url) / ".tvr").exists()  # the torn segment went with the pack


def test_staged_rows_are_read_before_and_after_packing(tmp_path: Path) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", make_items(10), shard_rows=4)
    s.ensure_feature(SPEC16, RANDOM)
    assert s._shard_rows["resnet152"] == 4 and s._arrays["resnet152"]["values"].shards == (4, 5, 6)
    for row in (0, 1, 2, 9):
        s.write("resnet152", row, rows(SPEC16, 2, seed=row))
    s.write_failed("resnet152", 3, "oom")
    before = s.read("resnet152")
    assert s.staged_count("resnet152") == 5
    assert s.pack_ready() == 1  # shard 0 (rows 0-3) is final; shard 2 (rows 8-9) still has row 8 PENDING
    assert s.staged_count("resnet152") == 1 and not (Path(s.url) / ".tvr" / "staging" / "resnet152" / "0").exists()
    status = zarr.open_array(f"{s.url}/resnet152/status", mode="r")
    np.testing.assert_array_equal(status[:4], [1, 1, 1, 3])  # packed, status included
    assert status[9] == 0  # still staged
    after = s.read("resnet152")
    for k in ("values", "mask", "status", "available"):
        np.testing.assert_array_equal(getattr(before, k), getattr(after, k))
    assert list(s.reasons("resnet152")[:4]) == ["", "", "", "oom"]
    assert s.pack_ready(partial=True) == 1 and s.staged_count("resnet152") == 0
    np.testing.assert_array_equal(s.read("resnet152").values, before.values)
    assert not (Path(s.url) / ".tvr").exists()  # nothing of the staging area is left behind
    files = [p for p in (Path(s.url) / "resnet152").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) <= 3 * 8  # one object per shard and array (3 shards, 8 arrays), never one per row


def test_xarray_opens_root_groups_and_tree(store: FeatureStore) -> None:
    import dask.array as da
    import xarray as xr

    r = rows(SPEC16, 2, seed=9)
    r.values[0, 0] = 0.0  # a real zero must not turn into NaN (fill value is not a mask in v3)
    store.write("resnet152", 0, r)
    with pytest.warns(UserWarning, match="staged rows that xarray does not see"):
        store.to_xarray("resnet152")
    assert store.pack_ready(partial=True) == 1  # xarray/dask see packed rows only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = xr.open_zarr(store.url, consolidated=False)
        grp = xr.open_zarr(store.url, group="resnet152", consolidated=False)
        tree = xr.open_datatree(store.url, engine="zarr", consolidated=False)
    assert dict(root.sizes) == {"item": 6, "caption": 12}
    assert isinstance(root["item_id"].data, da.Array)
    assert list(root["item_id"].values) == [f"v{i}" for i in range(6)]
    assert root["caption_text"].values[1] == "a caption 1 for v0 ünïcode"
    assert grp["values"].dims == ("item", "resnet152_step", "resnet152_dim")
    assert isinstance(grp["values"].data, da.Array)
    np.testing.assert_allclose(grp["values"].values[0, :2], r.values.astype(np.float16))
    assert grp["values"].values[0, 0, 0] == 0.0 and grp["status"].values[0] == Status.OK
    assert tree["dlib_face"]["values"].dims == ("item", "dlib_face_step", "dlib_face_slot", "dlib_face_dim")
    assert tree["clip_text"]["values"].dims[0] == "caption"
    ds = store.to_xarray("resnet152")
    assert list(ds["item"].values[:2]) == ["v0", "v1"]
    assert float(ds["values"].sel(item="v0").isel(resnet152_step=1, resnet152_dim=2)) == pytest.approx(
        float(np.float16(r.values[1, 2])))
    assert list(store.to_xarray("clip_text")["caption"].values[:2]) == ["v0/c0", "v0/c1"]
    assert str(store.to_xarray()["item_split"].sel(item="v2").values) == "test"


def test_fsspec_memory_url_store() -> None:
    url = "memory://tvr-test-store.zarr"
    items = make_items(3)
    s = FeatureStore.create(url, items, overwrite=True)
    s.ensure_feature(SPEC32, RANDOM)
    s.write("vggish", 2, rows(SPEC32, 2, seed=10))
    again = FeatureStore.open(url)
    np.testing.assert_array_equal(again.status("vggish"), [0, 0, 1])  # zarr path (no local fast path)
    np.testing.assert_array_equal(again.read("vggish", [2]).values[0, :2], rows(SPEC32, 2, seed=10).values)


def test_read_many_features_and_caption_rows(store: FeatureStore) -> None:
    store.write("resnet152", 2, rows(SPEC16, 2, seed=11))
    store.write("vggish", 2, FeatureRows.absent(SPEC32, "no_audio"))
    store.write("vggish", 4, rows(SPEC32, 3, seed=12))
    got = store.read_many(["resnet152", "vggish", "dlib_face"], [4, 2])
    assert list(got) == ["resnet152", "vggish", "dlib_face"]
    np.testing.assert_array_equal(got["resnet152"].available, [False, True])
    np.testing.assert_array_equal(got["vggish"].available, [True, False])
    np.testing.assert_array_equal(got["vggish"].values[0], rows(SPEC32, 3, seed=12).values)
    assert got["dlib_face"].values.shape == (2, 4, 2, 3) and not got["dlib_face"].available.any()
    for name, b in got.items():  # the same as reading each feature alone
        np.testing.assert_array_equal(b.values, store.read(name, [4, 2]).values)
    with pytest.raises(StoreError, match="mix item and caption axes"):
        store.read_many(["resnet152", "clip_text"])
    caps = store.caption_rows([4, 1])
    np.testing.assert_array_equal(caps, [2, 3, 8, 9])
    assert list(store.captions().id[caps]) == ["v1/c0", "v1/c1", "v4/c0", "v4/c1"]
    assert store.read_many(["clip_text"], caps)["clip_text"].values.shape == (4, 1, 4)


def test_store_id_is_created_once_and_survives_reopen(tmp_path: Path) -> None:
    a = FeatureStore.create(tmp_path / "a.zarr", make_items(2))
    b = FeatureStore.create(tmp_path / "b.zarr", make_items(2))
    assert len(a.store_id) == 32 and int(a.store_id, 16) >= 0 and a.store_id != b.store_id
    assert FeatureStore.open(a.url).store_id == a.store_id == FeatureStore.open(a.url, "r+").store_id
    assert zarr.open_group(a.url, mode="r").attrs["tvr_store_id"] == a.store_id


def test_store_id_of_an_old_store_appears_on_first_write_open(tmp_path: Path) -> None:
    s = FeatureStore.create(tmp_path / "old.zarr", make_items(2))
    g = zarr.open_group(s.url, mode="r+")
    attrs = g.attrs.asdict()
    del attrs["tvr_store_id"]
    g.attrs.clear()
    g.attrs.update(attrs)  # as written before store ids existed
    assert FeatureStore.open(s.url).store_id == ""  # read-only: nothing is written
    made = FeatureStore.open(s.url, "r+").store_id
    assert len(made) == 32 and FeatureStore.open(s.url).store_id == made


def test_nan_on_invalid_steps_is_stored_as_zero_without_touching_the_input(store: FeatureStore) -> None:
    vals = np.ones((SPEC16.max_steps, SPEC16.dim), dtype=np.float16)  # a full row in the stored dtype: no copy
    vals[2] = np.nan
    mask = np.array([True, True, False, True, True])
    store.write("resnet152", 0, FeatureRows(Status.OK, vals, np.arange(5.0), mask=mask))
    assert np.isnan(vals[2]).all()  # the caller's array is unchanged
    b = store.read("resnet152", [0])  # v2 reads NaN as lost data, so invalid steps must hold zeros
    assert b.available[0] and (b.values[0, 2] == 0).all() and (b.values[0, 3] == 1).all()
