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


def test_set_is_arrays_not_a_root_attribute_and_replacing_drops_the_old_arrays(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    s = _store(tmp_path / "s.zarr")
    s.set_choices(*QUESTIONS)
    first = zarr.open_group(url, mode="r").attrs["tvr_choices"]
    assert first == {"format": 2, "group": first["group"], "questions": 2, "options": 3}  # a pointer, no ids
    assert (tmp_path / "s.zarr" / first["group"] / "captions" / "zarr.json").is_file()
    assert s.choices_info()["questions"] == 2 and s.choices_info()["bytes"] > 0
    s.set_choices(["v3"], [["v3#1", "v0#0"]], [0])
    second = zarr.open_group(url, mode="r").attrs["tvr_choices"]
    assert not (tmp_path / "s.zarr" / first["group"]).exists()  # superseded arrays are deleted
    assert [p.name for p in (tmp_path / "s.zarr" / "_choices").iterdir() if p.is_dir()] == [second["group"][9:]]
    assert FeatureStore.open(url).features == []  # the _choices group is no feature


def test_a_crash_before_the_switch_keeps_the_old_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from store import _choices

    url = str(tmp_path / "s.zarr")
    s = _store(tmp_path / "s.zarr")
    s.set_choices(*QUESTIONS)

    original = _choices.ChoicesMixin._write_set

    def write_then_die(self: FeatureStore, name: str, mc: ChoiceSet) -> None:
        original(self, name, mc)
        raise KeyboardInterrupt  # killed after writing the new arrays, before the attribute switch

    monkeypatch.setattr(_choices.ChoicesMixin, "_write_set", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        s.set_choices(["v3"], [["v3#1", "v0#0"]], [0])
    monkeypatch.undo()
    np.testing.assert_array_equal(FeatureStore.open(url).choices().items, [2, 0])  # the old set, whole
    assert len([p for p in (tmp_path / "s.zarr" / "_choices").iterdir() if p.is_dir()]) == 2
    FeatureStore.open(url, "r+").set_choices(["v3"], [["v3#1", "v0#0"]], [0])  # cleans the orphan up
    assert len([p for p in (tmp_path / "s.zarr" / "_choices").iterdir() if p.is_dir()]) == 1


def test_damaged_set_arrays_are_named(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    s = _store(tmp_path / "s.zarr")
    s.set_choices(*QUESTIONS)
    group = zarr.open_group(url, mode="r").attrs["tvr_choices"]["group"]
    zarr.open_array(f"{url}/{group}/captions", mode="r+")[0, 1] = 99  # a caption row the store does not have
    with pytest.raises(StoreError, match=r"question\(s\) \[0\] refer to rows outside the store's 4 items / 8 "):
        FeatureStore.open(url).choices()
    zarr.open_array(f"{url}/{group}/captions", mode="r+")[0, 1] = 5
    zarr.open_array(f"{url}/{group}/answer", mode="r+")[0] = 0  # option 0 (v1#0) is no caption of v2
    with pytest.raises(StoreError, match=r"true option is not a caption of the question's item, e.g. items \[2\]"):
        FeatureStore.open(url).choices()
    import shutil

    shutil.rmtree(tmp_path / "s.zarr" / group)
    with pytest.raises(StoreError, match=r"multiple-choice set '_choices/\w+' cannot be opened"):
        FeatureStore.open(url).choices()


def test_a_million_questions_stay_out_of_zarr_json(tmp_path: Path) -> None:
    n_q, n_items = 1_000_000, 500
    items = [ItemRecord(f"v{i}", f"/v{i}.mp4") for i in range(n_items)]
    caps = [CaptionRecord(f"v{i}#{k}", f"v{i}", "c") for i in range(n_items) for k in range(2)]
    s = FeatureStore.create(str(tmp_path / "s.zarr"), items, caps)
    rng = np.random.default_rng(0)
    q_item = rng.integers(n_items, size=n_q)
    other = (q_item + 1 + rng.integers(n_items - 1, size=n_q)) % n_items
    cap_ids = np.asarray([c.id for c in caps])
    options = np.stack([cap_ids[2 * q_item], cap_ids[2 * other + 1]], axis=1)
    s.set_choices(np.asarray([it.id for it in items])[q_item], options, np.zeros(n_q, dtype=np.int64))
    assert (tmp_path / "s.zarr" / "zarr.json").stat().st_size < 4096
    mc = FeatureStore.open(str(tmp_path / "s.zarr")).choices()
    np.testing.assert_array_equal(mc.items, q_item)
    np.testing.assert_array_equal(mc.captions, np.stack([2 * q_item, 2 * other + 1], axis=1))
    files = [p for p in (tmp_path / "s.zarr" / "_choices").rglob("*") if p.is_file()]
    assert len(files) < 64  # shards of 65536 questions, not one object per question
