"""Reruns never mix settings: decode settings and options recorded and compared; changed manifests refused or
applied (tables updated, affected rows PENDING again), without Ray."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines import rerun
from pipelines.config import ExtractConfig
from pipelines.dataset import Dataset
from store.schema import CaptionRecord, FeatureRows, FeatureSpec, ItemRecord, Status

FRAME = FeatureSpec(name="frames", dim=2, max_steps=3, dtype="float32")
AUDIO = FeatureSpec(name="audio", dim=1, max_steps=3, dtype="float32", modality="audio")
TEXT = FeatureSpec(name="text", dim=2, max_steps=1, dtype="float32", modality="text", axis="caption", chunk_rows=2)
WEIGHTS = {"file": "w.pt", "sha256": "00"}


def _prov(options: dict[str, Any] | None = None, **decode: Any) -> dict[str, Any]:
    prov: dict[str, Any] = {"weights": WEIGHTS, "preset": "p", "variant": "v", "options": dict(options or {})}
    if decode:
        prov["decode"] = {"fps": 25.0, "height": None, "frame_rule": "nearest", **decode}
    return prov


def _items(n: int = 4) -> list[ItemRecord]:
    return [ItemRecord(id=f"v{i}", path=f"/data/v{i}.mp4", split="train") for i in range(n)]


def _captions(n: int = 4) -> list[CaptionRecord]:
    return [CaptionRecord(id=f"v{i}#0", item=f"v{i}", text=f"text {i}") for i in range(n)]


def _store(tmp_path: Path, frame_prov: dict[str, Any], n: int = 4) -> Any:
    from store.zarr_store import FeatureStore

    fs = FeatureStore.create(str(tmp_path / "s.zarr"), _items(n), _captions(n))
    fs.ensure_feature(FRAME, frame_prov)
    fs.ensure_feature(AUDIO, _prov({"sample_rate": 16000}))
    fs.ensure_feature(TEXT, _prov())
    return fs


def _fill(fs: Any) -> None:
    """Every row OK."""
    for name, spec in ((FRAME.name, FRAME), (AUDIO.name, AUDIO)):
        for r in range(fs.n_items):
            fs.write(name, r, FeatureRows(Status.OK, np.ones((1, spec.dim), np.float32), np.zeros(1, np.float32)))
    fs.write_block(TEXT.name, 0, [FeatureRows(Status.OK, np.ones((1, 2), np.float32), np.zeros(1, np.float32))
                                  for _ in range(fs.n_captions)])


def test_decode_settings_come_from_the_config_and_only_frame_features_get_them() -> None:
    cfg = ExtractConfig(source="d", store="s", decode_height=128, frame_rule="floor")
    assert rerun.decode_settings(cfg) == {"fps": 25.0, "height": 128, "frame_rule": "floor"}
    assert rerun.with_decode({"weights": WEIGHTS}, True, cfg)["decode"]["height"] == 128
    assert "decode" not in rerun.with_decode({"weights": WEIGHTS}, False, cfg)


def test_same_settings_pass_and_a_new_feature_is_not_compared(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov(height=128))
    rerun.check_settings(fs, {"frames": (FRAME, _prov(height=128)), "audio": (AUDIO, _prov({"sample_rate": 16000})),
                              "new_one": (FRAME, _prov(height=64))})


def test_other_decode_height_and_frame_rule_are_refused_naming_both(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov(height=128))
    with pytest.raises(rerun.SettingsMismatch) as info:
        rerun.check_settings(fs, {"frames": (FRAME, _prov(height=None, frame_rule="floor"))})
    msg = str(info.value)
    assert "feature 'frames'" in msg and str(fs.url) in msg
    assert "decode.height: stored 128, this run null" in msg
    assert 'decode.frame_rule: stored "nearest", this run "floor"' in msg
    assert "--decode-height 128" in msg and "--frame-rule nearest" in msg


def test_other_extractor_options_are_refused_but_device_options_are_not(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov({"policy": {"fps": 1.0}, "dlib_use_cuda": False}, height=None))
    rerun.check_settings(fs, {"frames": (FRAME, _prov({"policy": {"fps": 1.0}, "dlib_use_cuda": True}, height=None))})
    with pytest.raises(rerun.SettingsMismatch, match=r'options.policy: stored \{"fps": 1.0\}, this run \{"fps": 2.0\}'):
        rerun.check_settings(fs, {"frames": (FRAME, _prov({"policy": {"fps": 2.0}}, height=None))})
    with pytest.raises(rerun.SettingsMismatch, match="options.sample_rate: stored 16000, this run 8000"):
        rerun.check_settings(fs, {"audio": (AUDIO, _prov({"sample_rate": 8000}))})


def test_group_without_recorded_decode_settings_is_assumed_legacy(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov())  # a frame feature made before decode settings were recorded
    rerun.check_settings(fs, {"frames": (FRAME, _prov(frame_rule="floor"))})  # what tvr did then
    with pytest.raises(rerun.SettingsMismatch, match=r'frame_rule: stored "floor" \(assumed: .*predates') as info:
        rerun.check_settings(fs, {"frames": (FRAME, _prov(frame_rule="nearest"))})
    assert "--frame-rule floor" in str(info.value)


def _dataset(items: list[ItemRecord], captions: list[CaptionRecord]) -> Dataset:
    return Dataset(source="m.jsonl", items=items, captions=captions)


def _expected_changes(items: list[ItemRecord], new_items: list[ItemRecord], caps: list[CaptionRecord],
                      new_caps: list[CaptionRecord]) -> set[tuple[str, str]]:
    """Plain-Python reference: (id, what changed) for every changed field."""
    old = {r.id: r for r in items}
    out = {(r.id, col) for r in new_items if r.id in old for col in ("path", "kind", "split")
           if getattr(r, col) != getattr(old[r.id], col)}
    old_c = {c.id: c.text for c in caps}
    return out | {(c.id, "text") for c in new_caps if c.id in old_c and old_c[c.id] != c.text}


def test_unchanged_manifest_passes_and_new_rows_are_not_changes(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov(height=None))
    ds = _dataset(_items(6), _captions(6))  # two new items: added by the run, not a change
    ch = rerun.check_manifest(fs, ds, update=False, err=io.StringIO())
    assert ch.count == 0 and ch.gone_items == 0


def test_changed_paths_splits_and_captions_are_refused_with_a_list(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov(height=None), n=30)
    items, caps = _items(30), _captions(30)
    new_items = [ItemRecord(id=r.id, path=r.path.replace(".mp4", ".mkv") if i % 2 else r.path,
                            split="test" if i % 3 == 0 else "train") for i, r in enumerate(items)]
    new_caps = [CaptionRecord(id=c.id, item=c.item, text=c.text + "!" if i % 5 == 0 else c.text)
                for i, c in enumerate(caps)]
    want = _expected_changes(items, new_items, caps, new_caps)
    ch = rerun.manifest_changes(fs, _dataset(new_items, new_caps))
    assert ch.count == len(want) == 15 + 10 + 6
    with pytest.raises(rerun.SettingsMismatch) as info:
        rerun.check_manifest(fs, _dataset(new_items, new_caps), update=False, err=io.StringIO())
    msg = str(info.value)
    assert f"changed {len(want)} entries" in msg and f"... and {len(want) - rerun.SHOW} more" in msg
    assert "item 'v1': path '/data/v1.mp4' -> '/data/v1.mkv'" in msg and "--update-manifest" in msg
    assert msg.count("\n  item ") + msg.count("\n  caption ") == rerun.SHOW
    assert fs.items().path[1] == "/data/v1.mp4"  # refused: nothing written


def test_update_manifest_rewrites_tables_and_resets_only_affected_rows(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov(height=None), n=4)
    _fill(fs)
    items, caps = _items(4), _captions(4)
    new_items = list(items)
    new_items[1] = ItemRecord(id="v1", path="/data/other.mp4", split="train")  # values change: reset
    new_items[2] = ItemRecord(id="v2", path="/data/v2.mp4", split="val")  # a label only: no reset
    new_caps = list(caps)
    new_caps[3] = CaptionRecord(id="v3#0", item="v3", text="new words")
    err = io.StringIO()
    ch = rerun.check_manifest(fs, _dataset(new_items, new_caps), update=True, err=err)
    assert ch.count == 3 and "1 item row(s) and the chunks holding 1 caption row(s) are PENDING again" in err.getvalue()
    from store.zarr_store import FeatureStore

    fs2 = FeatureStore.open(fs.url)
    assert list(fs2.items().path) == [r.path for r in new_items]
    assert list(fs2.items().split) == [r.split for r in new_items]
    assert list(fs2.captions().text) == [c.text for c in new_caps]
    ok, pending = int(Status.OK), int(Status.PENDING)
    assert list(fs2.status("frames")) == list(fs2.status("audio")) == [ok, pending, ok, ok]
    assert list(fs2.status("text")) == [ok, ok, pending, pending]  # the changed caption's chunk (2 rows)
    assert rerun.manifest_changes(fs2, _dataset(new_items, new_caps)).count == 0  # the rerun after is clean


def test_removed_items_and_captions_are_noted_not_deleted(tmp_path: Path) -> None:
    fs = _store(tmp_path, _prov(height=None), n=4)
    err = io.StringIO()
    ch = rerun.check_manifest(fs, _dataset(_items(3), _captions(2)), update=False, err=err)
    assert (ch.gone_items, ch.gone_captions, ch.count) == (1, 2, 0)
    assert "1 item(s) and 2 caption(s)" in err.getvalue() and fs.n_items == 4
