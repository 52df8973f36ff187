"""FeatureStore's multiple-choice set: written and read by id through the store, checked, old raw attrs still read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from store import CaptionRecord, ChoiceSet, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status, StoreError

RANDOM = {"weights": {"random": True, "seed": 0}}


def _store(path: Path) -> FeatureStore:
    items = [ItemRecord(f"v{i}", f"/v{i}.mp4", split="test") for i in range(4)]
    caps = [CaptionRecord(f"v{i}#{k}", f"v{i}", f"caption {k} of v{i}") for i in range(4) for k in range(2)]
    return FeatureStore.create(str(path), items, caps)


QUESTIONS = (["v2", "v0"], [["v1#0", "v2#1", "v3#0"], ["v0#0", "v3#1", "v2#0"]], [1, 0])


def test_set_and_read_by_rows_replace_and_reopen(tmp_path: Path) -> None:
    s = _store(tmp_path / "s.zarr")
    assert s.choices() is None
    s.set_choices(*QUESTIONS)
    for st in (s, FeatureStore.open(str(tmp_path / "s.zarr"))):
        mc = st.choices()
        assert isinstance(mc, ChoiceSet)
        np.testing.assert_array_equal(mc.items, [2, 0])
        np.testing.assert_array_equal(mc.captions, [[2, 5, 6], [0, 7, 4]])  # caption row = 2 * item + k
        np.testing.assert_array_equal(mc.answer, [1, 0])
    s.set_choices(["v3"], [["v3#1", "v0#0"]], [0])  # replaces the earlier set
    np.testing.assert_array_equal(FeatureStore.open(str(tmp_path / "s.zarr")).choices().captions, [[7, 0]])
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(str(tmp_path / "s.zarr")).set_choices(*QUESTIONS)


def test_ids_appended_later_stay_valid(tmp_path: Path) -> None:
    s = _store(tmp_path / "s.zarr")
    s.set_choices(*QUESTIONS)
    s.add_items([ItemRecord("a", "/a.mp4")], [CaptionRecord("a#0", "a", "new")])
    s.set_choices(["a", "v1"], [["v0#0", "a#0"], ["v1#1", "a#0"]], [1, 0])
    mc = FeatureStore.open(str(tmp_path / "s.zarr")).choices()
    np.testing.assert_array_equal(mc.items, [4, 1])
    np.testing.assert_array_equal(mc.captions, [[0, 8], [3, 8]])


@pytest.mark.parametrize("items, caps, answer, match", [
    (["v9"], [["v0#0", "v1#0"]], [0], r"1 item id\(s\) .* not in the store, e.g. \['v9'\]"),
    (["v0"], [["v0#0", "nope#3"]], [0], r"caption id\(s\) .* e.g. \['nope#3'\]"),
    (["v0"], [["v0#0", "v1#0"]], [2], r"answer\(s\) outside 0..1 at question\(s\) \[0\]"),
    (["v0", "v1"], [["v0#0", "v1#0"], ["v1#0"]], [0, 0], r"same number \(>= 2\) of options"),
    (["v0"], [["v1#0", "v0#0"]], [0], r"true option is not a caption of the question's item, e.g. items \['v0'\]"),
    (["v0", "v1"], [["v0#0", "v1#0"]], [0], r"one option list and one answer per question"),
    ([], [], [], r"one option list and one answer per question"),
])
def test_bad_sets_are_refused_naming_the_problem(tmp_path: Path, items: list[str], caps: list[list[str]],
                                                  answer: list[int], match: str) -> None:
    s = _store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=match):
        s.set_choices(items, caps, answer)
    assert FeatureStore.open(str(tmp_path / "s.zarr")).choices() is None  # nothing half-written


def test_raw_attribute_of_older_stores_reads_and_damage_is_named(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    _store(tmp_path / "s.zarr")
    root = zarr.open_group(url, mode="r+")  # how stores were written before FeatureStore.set_choices existed
    root.attrs["tvr_choices"] = {"item": ["v1"], "captions": [["v0#1", "v1#0"]], "answer": [1]}
    mc = FeatureStore.open(url).choices()
    np.testing.assert_array_equal(mc.items, [1])
    np.testing.assert_array_equal(mc.captions, [[1, 2]])
    root.attrs["tvr_choices"] = {"item": ["v1"], "captions": [["v0#1", "gone"]], "answer": [1]}
    with pytest.raises(StoreError, match=r"s\.zarr: 1 caption id\(s\) .* \['gone'\]"):
        FeatureStore.open(url).choices()
    root.attrs["tvr_choices"] = {"item": ["v1"], "captions": [3], "answer": [0]}
    with pytest.raises(StoreError, match=r"root attribute 'tvr_choices' is malformed .*FeatureStore.set_choices"):
        FeatureStore.open(url).choices()


def test_store_data_keeps_questions_it_can_score(tmp_path: Path) -> None:
    from train.data import StoreData

    s = _store(tmp_path / "s.zarr")
    video = FeatureSpec("resnet152", dim=4, max_steps=2)
    text = FeatureSpec("clip_text", dim=4, max_steps=1, dtype="float32", modality="text", axis="caption")
    for spec in (video, text):
        s.ensure_feature(spec, RANDOM)
    ok = FeatureRows(Status.OK, np.ones((1, 4)), np.zeros(1))
    for row in range(4):
        s.write("resnet152", row, ok if row != 2 else FeatureRows.absent(video, "no_frames", "test"))
    for row in range(8):
        s.write("clip_text", row, ok if row != 7 else FeatureRows.absent(text, "empty", "test"))
    s.set_choices(["v0", "v2", "v1"], [["v0#0", "v1#0"], ["v2#0", "v0#0"], ["v1#1", "v3#1"]], [0, 0, 0])
    s.pack_ready(partial=True)
    mc = StoreData(FeatureStore.open(str(tmp_path / "s.zarr")), "xpool",
                   model_config={"frames_feature": "resnet152", "text_feature": "clip_text"}).choice_set()
    assert mc is not None  # v2: no video feature; v1's option v3#1 (row 7): no text feature
    np.testing.assert_array_equal(mc.items, [0])
    np.testing.assert_array_equal(mc.captions, [[0, 2]])
