"""store.maintain and its CLI: integrity errors, `tvr-store verify [--repair]`, `tvr-store compact` (v1 -> v2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from store import CaptionRecord, ExtraSpec, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status, StoreError
from store.cli import main
from store.schema import ROOT_ARRAYS, feature_arrays, pad_row

RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
VID = FeatureSpec("resnet152", dim=5, max_steps=4)
FACE = FeatureSpec("dlib_face", dim=3, max_steps=2, slots=2, modality="face", extras=(ExtraSpec("box", (4,)),))
TEXT = FeatureSpec("clip_text", dim=3, max_steps=1, dtype="float32", modality="text", axis="caption", chunk_rows=4)


def items(n: int) -> list[ItemRecord]:
    return [ItemRecord(f"v{i}", f"/d/v{i}.mp4", split=("train", "test")[i % 2], duration=float(i)) for i in range(n)]


def captions(its: list[ItemRecord]) -> list[CaptionRecord]:
    return [CaptionRecord(f"{it.id}#{j}", it.id, f"text {j} of {it.id}") for it in its for j in range(2)]


def row_result(spec: FeatureSpec, row: int) -> FeatureRows:
    """Deterministic content per row: OK (most), ABSENT (row % 5 == 1), nothing (PENDING, row % 5 == 2)."""
    if row % 5 == 1:
        return FeatureRows.absent(spec, "no_face", f"row {row} has none")
    n = row % spec.max_steps + 1
    rng = np.random.default_rng(row)
    shape = (n, spec.slots, spec.dim) if spec.slots else (n, spec.dim)
    extras = {"box": rng.uniform(0, 9, (n, spec.slots, 4)).astype(np.float32)} if spec.extras else {}
    return FeatureRows(Status.OK, rng.standard_normal(shape), np.arange(n) * 0.5, extras=extras)


def make_v1_store(path: Path, n: int = 11) -> Path:
    """A schema v1 store (one chunk per row, no sharding, no staging), written with plain zarr as tvr 0.1 did."""
    its, caps = items(n), captions(items(n))
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    cols = {"item_id": [i.id for i in its], "item_path": [i.path for i in its], "item_kind": [i.kind for i in its],
            "item_split": [i.split for i in its], "item_duration": [i.duration for i in its],
            "caption_id": [c.id for c in caps], "caption_item": [int(c.item[1:]) for c in caps],
            "caption_text": [c.text for c in caps]}
    for name, (dtype, dim, fill) in ROOT_ARRAYS.items():
        a = g.create_array(name, shape=(len(cols[name]),), chunks=(16384,), dtype=dtype, dimension_names=(dim,),
                           fill_value=fill)
        a[:] = np.array(cols[name], dtype=object if dtype == "str" else dtype)
    for spec in (VID, FACE, TEXT):
        rows = n if spec.axis == "item" else len(caps)
        grp = g.create_group(spec.name)
        arrs = {k: grp.create_array(k, **kw) for k, kw in feature_arrays(spec, rows).items()}
        grp.attrs.update({"spec": json.loads(spec.to_json()), "provenance": {**RANDOM, "created": "2025-01-01"}})
        for row in range(rows):
            if row % 5 == 2:
                continue  # PENDING
            p = pad_row(spec, row, row_result(spec, row) if spec.axis == "item" else
                        FeatureRows(Status.OK, np.full((1, 3), float(row)), np.zeros(1)))
            if row % 7 == 3:
                p.update(status=np.uint8(Status.FAILED), reason="decode_error", message=f"bad {row}")
            for k, v in p.items():
                arrs[k][row] = v
    g.attrs.update({"tvr_store": 1, "tvr_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00"})
    return path


def v2_store(tmp_path: Path, n: int = 9, shard_rows: int = 4) -> FeatureStore:
    s = FeatureStore.create(tmp_path / "s.zarr", items(n), captions(items(n)), shard_rows=shard_rows)
    s.ensure_feature(VID, RANDOM)
    for row in range(n):
        s.write("resnet152", row, row_result(VID, row))
    assert s.pack_ready(partial=True) == 3
    return s


# ---- integrity ----
def test_lost_values_shard_is_an_error_never_zeros(tmp_path: Path) -> None:
    s = v2_store(tmp_path)
    assert s.read("resnet152", [0]).available[0]
    (Path(s.url) / "resnet152" / "values" / "c" / "0" / "0" / "0").unlink()  # shard of rows 0-3
    with pytest.raises(StoreError, match=r"rows \[0, 2, 3\].*marked OK but their data is missing.*verify .* --repair"):
        s.read("resnet152", [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(s.read("resnet152", [4, 5]).available, [True, True])  # other shards fine
    assert main(["verify", s.url]) == 1
    assert main(["verify", s.url, "--repair"]) == 1
    again = FeatureStore.open(s.url)
    np.testing.assert_array_equal(again.status("resnet152")[:4], [0, 2, 0, 0])  # OK rows reset, ABSENT (1) kept
    assert main(["verify", s.url]) == 0


def test_lost_mask_inner_chunk_is_an_error(tmp_path: Path) -> None:
    s = v2_store(tmp_path)
    a = zarr.open_array(f"{s.url}/resnet152/mask", mode="r+")
    a[4:8] = np.zeros((4, 4), bool)  # as if the mask data of shard 1 were lost (fill value)
    with pytest.raises(StoreError, match=r"rows \[4, 5, 7\] \(of 3\)"):
        s.read("resnet152", slice(4, 8))


def test_invalid_status_code_is_reported_and_repaired(tmp_path: Path) -> None:
    s = v2_store(tmp_path)
    st = zarr.open_array(f"{s.url}/resnet152/status", mode="r+")
    st[5] = 7  # a byte no Status has: silently dropped from every count before
    with pytest.raises(StoreError, match=r"'resnet152/status' holds invalid codes \[7\] at 1 row\(s\), e\.g\. \[5\]"):
        s.coverage()
    with pytest.raises(StoreError, match="invalid status codes"):
        s.read("resnet152", [5])
    assert main(["verify", s.url]) == 1
    assert main(["verify", s.url, "--repair"]) == 1
    assert FeatureStore.open(s.url).status("resnet152")[5] == Status.PENDING  # extraction will redo it


def test_garbage_status_shard_names_the_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = v2_store(tmp_path)
    (Path(s.url) / "resnet152" / "status" / "c" / "1").write_bytes(b"\x07garbage" * 3)
    with pytest.raises(StoreError, match=r"cannot read 'resnet152/status'.*damaged.*tvr-store verify"):
        s.status("resnet152")
    assert main(["info", s.url]) == 2 and "resnet152/status" in capsys.readouterr().err
    assert main(["verify", s.url, "--repair"]) == 1  # rewrites that status shard as PENDING
    np.testing.assert_array_equal(FeatureStore.open(s.url).status("resnet152")[4:8], [0, 0, 0, 0])


def test_corrupt_array_metadata_names_the_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = v2_store(tmp_path)
    (Path(s.url) / "resnet152" / "time" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    with pytest.raises(StoreError, match=r"metadata of 'resnet152/time'.*not valid JSON.*restore it"):
        FeatureStore.open(s.url)
    assert main(["info", s.url]) == 2 and "resnet152/time" in capsys.readouterr().err


def test_pickle_codec_is_refused_at_any_depth(tmp_path: Path) -> None:
    import warnings

    import numcodecs
    from zarr.core.dtype import VariableLengthBytes

    s = v2_store(tmp_path)
    zarr.open_group(s.url, mode="r+")["resnet152"].create_group("sub")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.create_array(zarr.storage.LocalStore(s.url), name="resnet152/sub/evil", shape=(2,), chunks=(2,),
                          dtype=VariableLengthBytes(), zarr_format=2, filters=[numcodecs.Pickle()],
                          compressors=None)
    with pytest.raises(StoreError, match="'resnet152/sub/evil' uses the pickle codec"):
        FeatureStore.open(s.url)


# ---- compact ----
def test_v1_store_opens_read_only_with_a_compact_hint(tmp_path: Path) -> None:
    src = make_v1_store(tmp_path / "old.zarr")
    s = FeatureStore.open(src)
    assert s.version == 1 and s.coverage()["resnet152"]["pending"] == 2  # rows 2 and 7  # reads work
    with pytest.raises(StoreError, match=r"schema v1 .* read-only.*tvr-store compact"):
        FeatureStore.open(src, "r+")


def _expected(spec: FeatureSpec, row: int) -> tuple[int, np.ndarray]:
    """Independent expectation for make_v1_store's rows: status and padded float32 values."""
    want = np.zeros(spec.value_shape(), np.float32)
    if row % 5 == 2:
        return Status.PENDING, want
    r = row_result(spec, row)
    n = len(r.values)
    want[:n] = r.values.astype(spec.dtype).astype(np.float32)
    if row % 7 == 3:
        return Status.FAILED, want
    return int(r.status), want


def test_compact_v1_to_v2_gives_an_equal_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_v1_store(tmp_path / "old.zarr", n=11)
    assert main(["compact", str(src), str(tmp_path / "new.zarr")]) == 0
    assert "checked equal" in capsys.readouterr().out
    old, new = FeatureStore.open(src), FeatureStore.open(tmp_path / "new.zarr")
    assert new.version == 2 and new._arrays["resnet152"]["values"].shards is not None
    assert new.provenance("resnet152") == old.provenance("resnet152") and new.spec("dlib_face") == FACE
    np.testing.assert_array_equal(new.items().id, [f"v{i}" for i in range(11)])
    np.testing.assert_array_equal(new.captions().text, old.captions().text)
    for spec in (VID, FACE):
        b = new.read(spec.name)
        for row in range(11):
            status, want = _expected(spec, row)
            assert b.status[row] == status
            if status == Status.OK:
                np.testing.assert_array_equal(b.values[row], want)
        np.testing.assert_array_equal(b.extras.get("box", 0), old.read(spec.name).extras.get("box", 0))
    assert list(new.reasons("resnet152")[[1, 3]]) == ["no_face", "decode_error"]
    assert list(new.messages("resnet152", [3])) == ["bad 3"]
    np.testing.assert_array_equal(new.read("clip_text").values, old.read("clip_text").values)
    files = sum(1 for p in (tmp_path / "new.zarr").rglob("*") if p.is_file())
    assert files < sum(1 for p in src.rglob("*") if p.is_file())
    FeatureStore.open(tmp_path / "new.zarr", "r+").write("resnet152", 2, row_result(VID, 0))  # writable now


def test_compact_in_place_keeps_the_original(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_v1_store(tmp_path / "old.zarr", n=6)
    before = FeatureStore.open(src).read("resnet152").values
    assert main(["compact", str(src)]) == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("old.zarr.v1-")]
    assert len(kept) == 1 and FeatureStore.open(kept[0]).version == 1
    now = FeatureStore.open(src)
    assert now.version == 2
    np.testing.assert_array_equal(now.read("resnet152").values, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["old.zarr", kept[0].name])


def test_compact_carries_the_multiple_choice_set_as_arrays(tmp_path: Path) -> None:
    src = make_v1_store(tmp_path / "old.zarr", n=6)
    zarr.open_group(str(src), mode="r+").attrs["tvr_choices"] = {  # how v1 stores held it: ids in the attribute
        "item": ["v1", "v4"], "captions": [["v0#1", "v1#0"], ["v4#1", "v2#0"]], "answer": [1, 0]}
    assert main(["compact", str(src), str(tmp_path / "new.zarr")]) == 0
    new = FeatureStore.open(tmp_path / "new.zarr")
    assert zarr.open_group(str(tmp_path / "new.zarr"), mode="r").attrs["tvr_choices"]["format"] == 2
    np.testing.assert_array_equal(new.choices().captions, [[1, 2], [9, 4]])
    new_again = tmp_path / "again.zarr"  # a v2 store's arrays-backed set is copied too (not its pointer alone)
    assert main(["compact", str(tmp_path / "new.zarr"), str(new_again)]) == 0
    np.testing.assert_array_equal(FeatureStore.open(new_again).choices().items, [1, 4])
