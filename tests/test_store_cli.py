"""`tvr-store info` / `tvr-store plot` (store/cli.py), in-process through `main(argv) -> int`, on real stores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store import CaptionRecord, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status
from store.cli import main

ROOT = Path(__file__).resolve().parents[1]
RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
RESNET = FeatureSpec("resnet152", dim=4, max_steps=3)
VGGISH = FeatureSpec("vggish", dim=2, max_steps=2, modality="audio")
TEXT = FeatureSpec("clip_text", dim=3, max_steps=1, dtype="float32", modality="text", axis="caption", chunk_rows=4)
WANT_FEATURES = {
    "clip_text": {"ok": 8, "absent": 0, "failed": 0, "pending": 4},
    "resnet152": {"ok": 2, "absent": 0, "failed": 4, "pending": 0},
    "vggish": {"ok": 1, "absent": 2, "failed": 0, "pending": 3},
}
WRITES = {"resnet152": 6, "vggish": 3, "clip_text": 2}  # write calls per feature in `store_path`


def ok(spec: FeatureSpec, n: int = 1) -> FeatureRows:
    return FeatureRows(Status.OK, np.ones((n, spec.dim), np.float32), np.arange(n, dtype=np.float32))


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """6 items, 12 captions; every status occurs, with known reasons."""
    items = [ItemRecord(f"v{i}", f"/data/v{i}.mp4") for i in range(6)]
    caps = [CaptionRecord(f"v{i}/{j}", f"v{i}", f"text {i} {j}") for i in range(6) for j in range(2)]
    path = tmp_path / "s.zarr"
    s = FeatureStore.create(path, items, caps)
    for spec in (RESNET, VGGISH, TEXT):
        s.ensure_feature(spec, RANDOM)
    s.write("resnet152", 0, ok(RESNET, 3))
    s.write("resnet152", 1, ok(RESNET))
    for row, reason in ((2, "decode_error"), (3, "decode_error"), (4, "decode_error"), (5, "oom")):
        s.write_failed("resnet152", row, reason, f"{reason} on row {row}")
    s.write("vggish", 0, ok(VGGISH, 2))
    s.write("vggish", 1, FeatureRows.absent(VGGISH, "no_audio"))
    s.write("vggish", 2, FeatureRows.absent(VGGISH, "no_audio"))
    for start in (0, 4):
        s.write_block("clip_text", start, [ok(TEXT) for _ in range(4)])
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_exact_schema(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["info", str(store_path), "--json"], capsys)
    assert code == 0 and err == ""
    doc = json.loads(out)  # exactly one JSON document, nothing else on stdout
    layout = doc.pop("layout")  # schema v2: per-feature layout, shard rows, files and bytes on disk
    assert layout["schema"] == 2 and set(layout["features"]) == set(WANT_FEATURES)
    for name, d in layout["features"].items():
        assert d["layout"] == "sharded" and d["shard_rows"] >= 256
        assert d["staged"] == WRITES[name]  # staged blocks (records), one per write call, none packed yet
        files = [p for p in (store_path / name).rglob("*") if p.is_file()]
        assert d["files"] == len(files) and d["bytes"] == sum(p.stat().st_size for p in files)
    assert doc.pop("choices") is None  # no multiple-choice set
    assert doc == {
        "items": 6,
        "features": WANT_FEATURES,
        "failure_reasons": {"clip_text": [], "resnet152": [{"reason": "decode_error", "count": 3},
                                                           {"reason": "oom", "count": 1}], "vggish": []},
    }
    code, out, _ = run(["info", str(store_path), "--json", "--top", "1"], capsys)
    assert code == 0 and json.loads(out)["failure_reasons"]["resnet152"] == [{"reason": "decode_error", "count": 3}]


def test_info_reports_the_multiple_choice_set_size(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    FeatureStore.open(store_path, "r+").set_choices(["v1", "v2"], [["v0/0", "v1/1"], ["v2/0", "v3/0"]], [1, 0])
    code, out, _ = run(["info", str(store_path), "--json"], capsys)
    mc = json.loads(out)["choices"]
    group = store_path / mc.pop("storage")
    files = [p for p in group.rglob("*") if p.is_file() and p != group / "zarr.json"]  # arrays: metadata + shards
    assert code == 0 and mc == {"questions": 2, "options": 2, "bytes": sum(p.stat().st_size for p in files)}
    code, out, _ = run(["info", str(store_path)], capsys)
    assert code == 0 and "multiple choice: 2 question(s) x 2 option(s) (_choices/" in out


def test_bad_storage_options_are_named(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["info", str(store_path), "--storage-options", "{not json"], capsys)
    assert code == 2 and "--storage-options: storage options are not valid JSON" in err
    code, _, err = run(["verify", str(store_path), "--storage-options", str(store_path / "nope.yaml")], capsys)
    assert code == 2 and "--storage-options: config file" in err and "nope.yaml' does not exist" in err
    code, out, _ = run(["info", str(store_path), "--json", "--storage-options", '{"auto_mkdir": true}'], capsys)
    assert code == 0 and json.loads(out)["items"] == 6  # plain paths ignore storage options


def test_info_json_counts_match_store_coverage(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["info", str(store_path), "--json"], capsys)
    assert code == 0 and json.loads(out)["features"] == FeatureStore.open(store_path).coverage()


def test_info_text_lists_counts_and_reasons(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["info", str(store_path)], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"store: {store_path}  items: 6  captions: 12"
    assert lines[1].split()[:8] == ["feature", "modality", "axis", "rows", "ok", "absent", "failed", "pending"]
    rows = {ln.split()[0]: ln.split() for ln in lines[3:lines.index("")]}
    layout = {ln.split()[0]: ln.split() for ln in lines[lines.index("") + 3:-1]}  # the layout table follows
    assert set(layout) == {"clip_text", "resnet152", "vggish"} and layout["resnet152"][1] == "sharded"
    assert lines[-1].startswith("schema v2: ")
    assert set(rows) == {"clip_text", "resnet152", "vggish"}
    assert rows["resnet152"][1:8] == ["appearance", "item", "6", "2", "0", "4", "0"]
    assert rows["resnet152"][8:] == ["failed:decode_error=3,", "failed:oom=1"]
    assert rows["vggish"][1:8] == ["audio", "item", "6", "1", "2", "0", "3"]
    assert rows["vggish"][8:] == ["absent:no_audio=2"]
    assert rows["clip_text"][1:] == ["text", "caption", "12", "8", "0", "0", "4", "-"]


def test_info_on_store_without_features(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    FeatureStore.create(tmp_path / "e.zarr", [ItemRecord("a", "/a.mp4")])
    code, out, _ = run(["info", str(tmp_path / "e.zarr"), "--json"], capsys)
    doc = json.loads(out)
    assert doc.pop("layout")["features"] == {}
    assert code == 0 and doc == {"items": 1, "features": {}, "failure_reasons": {}, "choices": None}
    code, out, _ = run(["info", str(tmp_path / "e.zarr")], capsys)
    assert code == 0 and "(no features yet)" in out.splitlines()


@pytest.mark.parametrize("what", ["missing", "plain_dir", "file"])
@pytest.mark.parametrize("command", ["info", "plot"])
def test_not_a_store_exits_2_naming_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str,
                                         command: str) -> None:
    path = tmp_path / "thing"
    if what == "plain_dir":
        path.mkdir()
    elif what == "file":
        path.write_text("not a store")
    argv = [command, str(path)] + ([str(tmp_path / "fig.png")] if command == "plot" else ["--json"])
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"tvr-store {command}: {path}")
    assert ("does not exist" if what == "missing" else "not a tvr store") in err
    assert "FeatureStore.create" in err  # says how to make one
    assert not (tmp_path / "fig.png").exists()


def test_plot_writes_figure(store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, svg = tmp_path / "avail.png", tmp_path / "avail.svg"
    code, out, _ = run(["plot", str(store_path), str(png)], capsys)
    assert code == 0 and out.strip() == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert run(["plot", str(store_path), str(svg)], capsys)[0] == 0
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "resnet152" in text  # the feature labels are in the figure


def test_plot_bad_output_path(store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["plot", str(store_path), str(tmp_path / "no" / "dir.png")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["plot", str(store_path), str(tmp_path / "fig.xyz")], capsys)
    assert code == 2 and "fig.xyz" in err and ".png" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["info"], ["frobnicate", "x"]):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 2
    assert "usage: tvr-store" in capsys.readouterr().err


def test_module_entry_point_prints_json(store_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "store.cli", "info", str(store_path), "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["features"] == WANT_FEATURES
