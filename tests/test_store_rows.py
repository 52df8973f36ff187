"""FeatureStore.reset_rows / update_items / update_captions: public, locked row resets and table updates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import CaptionRecord, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status, StoreError
from store import zarr_store

RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
SPEC = FeatureSpec("resnet152", dim=6, max_steps=5)
AUDIO = FeatureSpec("vggish", dim=3, max_steps=2, dtype="float32", modality="audio")
TEXT = FeatureSpec("clip_text", dim=4, max_steps=1, dtype="float32", modality="text", axis="caption", chunk_rows=4)


def ok(spec: FeatureSpec, v: float) -> FeatureRows:
    return FeatureRows(Status.OK, np.full((1, spec.dim), v), np.zeros(1))


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    """8 items with 2 captions each; every row of every feature OK, half of them packed."""
    items = [ItemRecord(f"v{i}", f"/v{i}.mp4", split="train") for i in range(8)]
    caps = [CaptionRecord(f"v{i}#{j}", f"v{i}", f"text {i} {j}") for i in range(8) for j in range(2)]
    s = FeatureStore.create(tmp_path / "s.zarr", items, caps, shard_rows=4)
    for spec in (SPEC, AUDIO, TEXT):
        s.ensure_feature(spec, RANDOM)
    for row in range(8):
        s.write("resnet152", row, ok(SPEC, row))
        s.write("vggish", row, ok(AUDIO, row))
    for start in range(0, 16, 4):
        s.write_block("clip_text", start, [ok(TEXT, start + i) for i in range(4)])
    s.pack_ready()  # shards 0-1 of the item features, 0-3 of captions: all final, so all packed
    for row in (5, 6):
        s.write("resnet152", row, ok(SPEC, 10 + row))  # staged rewrites on top of packed rows
    return s


def test_reset_rows_of_one_feature_packed_and_staged(store: FeatureStore) -> None:
    assert store.reset_rows("resnet152", [1, 6, 6]) == 2
    s = FeatureStore.open(store.url)
    assert list(np.flatnonzero(s.status("resnet152") == Status.PENDING)) == [1, 6]
    assert (s.status("vggish") == Status.OK).all()  # other features untouched
    b = s.read("resnet152")
    assert not b.available[[1, 6]].any() and (b.values[[1, 6]] == 0).all() and b.values[5, 0, 0] == 15.0
    FeatureStore.open(store.url, "r+").pack_ready(partial=True)  # packed like any write: still PENDING after
    assert list(np.flatnonzero(FeatureStore.open(store.url).status("resnet152") == 0)) == [1, 6]


def test_reset_rows_every_feature_of_an_axis_and_whole_chunks(store: FeatureStore) -> None:
    assert store.reset_rows(None, [2]) == 2  # resnet152 and vggish
    assert store.reset_rows(None, [5], axis="caption") == 4  # the clip_text chunk 4..7 (one writer per chunk)
    s = FeatureStore.open(store.url)
    assert list(np.flatnonzero(s.status("vggish") == 0)) == [2]
    assert list(np.flatnonzero(s.status("clip_text") == 0)) == [4, 5, 6, 7]
    with pytest.raises(StoreError, match="rows to reset must lie in 0:8"):
        store.reset_rows("resnet152", [8])
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(store.url).reset_rows("resnet152", [0])


def test_update_items_resets_rows_whose_file_changed_then_writes_the_table(store: FeatureStore) -> None:
    assert store.update_items([3, 4], {"path": ["/v3.mp4", "/new4.mp4"]}) == 1  # row 3's path is unchanged
    assert store.update_items([0], {"split": ["test"]}) == 0  # a split is a label: values stay valid
    s = FeatureStore.open(store.url)
    assert list(s.items().path[3:5]) == ["/v3.mp4", "/new4.mp4"] and s.items().split[0] == "test"
    for f in ("resnet152", "vggish"):
        assert list(np.flatnonzero(s.status(f) == 0)) == [4]
    assert (s.status("clip_text") == Status.OK).all()
    with pytest.raises(StoreError, match="unknown item column"):
        store.update_items([0], {"id": ["x"]})


def test_update_captions_resets_changed_caption_chunks(store: FeatureStore) -> None:
    assert store.update_captions([9, 10], ["new text", "text 5 0"]) == 1  # row 10's text is unchanged
    s = FeatureStore.open(store.url)
    assert s.captions().text[9] == "new text"
    assert list(np.flatnonzero(s.status("clip_text") == 0)) == [8, 9, 10, 11]
    assert (s.status("resnet152") == Status.OK).all()


def test_a_crash_between_reset_and_table_write_leaves_rows_pending(store: FeatureStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr

    def dying(self: object, *a: object, **kw: object) -> None:
        raise KeyboardInterrupt  # the process stops after the reset, before the table write

    monkeypatch.setattr(zarr.Array, "set_orthogonal_selection", dying)
    with pytest.raises(KeyboardInterrupt):
        store.update_items([2], {"path": ["/new2.mp4"]})
    monkeypatch.undo()
    s = FeatureStore.open(store.url)
    assert s.items().path[2] == "/v2.mp4" and s.status("resnet152")[2] == Status.PENDING  # redone, never stale


def test_row_updates_wait_for_the_structural_lock(store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> None:
    other = FeatureStore.open(store.url, "r+")._lock("structure", "structural")
    other.acquire()
    monkeypatch.setattr(zarr_store, "LOCK_TIMEOUT", 0.2)
    try:
        with pytest.raises(StoreError, match="lock is held"):
            FeatureStore.open(store.url, "r+").reset_rows("resnet152", [0])
    finally:
        other.release()
    assert FeatureStore.open(store.url).status("resnet152")[0] == Status.OK
