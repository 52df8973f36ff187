"""store.inspect (coverage table, failure reasons, availability figure, xarray views) and the example notebook
docs/inspect_store.py, executed cell by cell in-process on a store built here and on its own demo store."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import jupytext
import numpy as np
import pytest

from store import CaptionRecord, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status
from store.inspect import (
    STATUS_COLORS,
    availability_figure,
    coverage_table,
    demo_store,
    feature_frame,
    reason_counts,
    status_dataarray,
    summary,
    worst_status,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "inspect_store.py"
RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
RESNET = FeatureSpec("resnet152", dim=4, max_steps=3)
VGGISH = FeatureSpec("vggish", dim=2, max_steps=2, modality="audio")
TEXT = FeatureSpec("clip_text", dim=3, max_steps=1, dtype="float32", modality="text", axis="caption", chunk_rows=2)
# status per item row, as the fixture writes them
RESNET_ST = [Status.OK, Status.OK, Status.FAILED, Status.FAILED, Status.ABSENT, Status.PENDING]
VGGISH_ST = [Status.OK, Status.ABSENT, Status.ABSENT, Status.PENDING, Status.PENDING, Status.FAILED]


def write(store: FeatureStore, spec: FeatureSpec, row: int, status: Status, steps: int = 2) -> None:
    if status is Status.OK:
        vals = np.arange(steps * spec.dim, dtype=np.float32).reshape(steps, spec.dim) + row
        store.write(spec.name, row, FeatureRows(Status.OK, vals, np.arange(steps) * 0.5))
    elif status is Status.ABSENT:
        store.write(spec.name, row, FeatureRows.absent(spec, "no_audio" if spec is VGGISH else "no_motion"))
    elif status is Status.FAILED:
        store.write_failed(spec.name, row, "decode_error" if row != 3 else "oom", f"row {row} broke")


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    items = [ItemRecord(f"v{i}", f"/data/v{i}.mp4", kind="image" if i == 4 else "video", split="train")
             for i in range(6)]
    caps = [CaptionRecord(f"v{i}/c", f"v{i}", f"caption of v{i}") for i in range(6)]
    s = FeatureStore.create(tmp_path / "s.zarr", items, caps)
    for spec in (RESNET, VGGISH, TEXT):
        s.ensure_feature(spec, RANDOM)
    for row, (a, b) in enumerate(zip(RESNET_ST, VGGISH_ST)):
        write(s, RESNET, row, a, steps=1 + row % 3)
        write(s, VGGISH, row, b)
    s.write_block("clip_text", 0, [FeatureRows(Status.OK, np.ones((1, 3)), np.zeros(1))] * 2)
    return s


def test_summary_and_reason_counts(store: FeatureStore) -> None:
    doc = summary(store)
    assert doc["items"] == 6 and set(doc) == {"items", "features", "failure_reasons"}
    assert doc["features"] == {"clip_text": {"ok": 2, "absent": 0, "failed": 0, "pending": 4},
                               "resnet152": {"ok": 2, "absent": 1, "failed": 2, "pending": 1},
                               "vggish": {"ok": 1, "absent": 2, "failed": 1, "pending": 2}}
    assert doc["features"] == store.coverage()
    assert doc["failure_reasons"]["resnet152"] == [{"reason": "decode_error", "count": 1},
                                                   {"reason": "oom", "count": 1}]
    assert reason_counts(store, "vggish", Status.ABSENT) == [("no_audio", 2)]
    assert reason_counts(store, "vggish") == [("decode_error", 1)]
    assert reason_counts(store, "resnet152", Status.ABSENT) == [("no_motion", 1)]


def test_coverage_table_lines(store: FeatureStore) -> None:
    lines = coverage_table(store).splitlines()
    assert lines[0] == f"store: {store.url}  items: 6  captions: 6"
    assert set(lines[2]) == {"-"} and len(lines) == 6
    body = {ln.split()[0]: ln.split()[1:] for ln in lines[3:]}
    assert body["resnet152"] == ["appearance", "item", "6", "2", "1", "2", "1", "failed:decode_error=1,",
                                 "failed:oom=1,", "absent:no_motion=1"]
    assert body["clip_text"][:7] == ["text", "caption", "6", "2", "0", "0", "4"]


def test_status_dataarray_and_xarray_views(store: FeatureStore) -> None:
    da = status_dataarray(store)
    assert da.dims == ("item", "feature") and list(da.coords["feature"].values) == ["resnet152", "vggish"]
    assert list(da.coords["item"].values) == [f"v{i}" for i in range(6)]  # caption features are not item rows
    np.testing.assert_array_equal(da.sel(feature="resnet152").values, [int(s) for s in RESNET_ST])
    np.testing.assert_array_equal(da.sel(feature="vggish").values, [int(s) for s in VGGISH_ST])
    assert da.attrs["flag_meanings"] == "pending ok absent failed"
    ds = feature_frame(store, "resnet152", [1, 2])
    assert list(ds["item"].values) == ["v1", "v2"]
    np.testing.assert_array_equal(ds["status"].values, [Status.OK, Status.FAILED])
    np.testing.assert_array_equal(ds["mask"].values, [[True, True, False], [False, False, False]])
    np.testing.assert_array_equal(ds["values"].values[0, :2], np.arange(8).reshape(2, 4) + 1)
    assert ds["values"].dims == ("item", "resnet152_step", "resnet152_dim")
    FeatureStore.open(store.url, "r+").pack_ready(partial=True)  # xarray/dask see packed rows only (schema v2)
    lazy = store.to_xarray("vggish")
    assert type(lazy["values"].data).__module__.startswith("dask")  # dask-backed until loaded
    assert str(lazy["reason"].sel(item="v1").values) == "no_audio"


def test_availability_figure_shows_status_and_counts(store: FeatureStore, tmp_path: Path) -> None:
    from matplotlib.colors import to_hex

    fig = availability_figure(store)
    heat, bars = fig.axes[:2]
    img = heat.images[0]
    np.testing.assert_array_equal(np.asarray(img.get_array()), np.array([RESNET_ST, VGGISH_ST], dtype=np.uint8))
    assert [to_hex(img.cmap(img.norm(int(s)))) for s in Status] == [STATUS_COLORS[s] for s in Status]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["resnet152 (appearance)", "vggish (audio)"]
    # stacked bars: one bar per (status, feature), in OK, ABSENT, FAILED, PENDING order; features sorted
    widths = np.array([p.get_width() for p in bars.patches]).reshape(4, 3)
    cov = store.coverage()
    for i, s in enumerate(("ok", "absent", "failed", "pending")):
        np.testing.assert_array_equal(widths[i], [cov[n][s] for n in store.features])
    assert [t.get_text() for t in bars.get_yticklabels()] == ["clip_text [caption]", "resnet152 [item]",
                                                             "vggish [item]"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ok", "absent", "failed", "pending"]
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_availability_figure_keeps_failures_visible_when_binned(store: FeatureStore) -> None:
    fig = availability_figure(store, max_items=3)  # 6 rows -> 3 columns of 2 rows: the worst of each pair
    heat = fig.axes[0]
    ok, ab, fa, pe = Status.OK, Status.ABSENT, Status.FAILED, Status.PENDING
    want = np.array([[ok, fa, pe],  # resnet152: (OK, OK) (FAILED, FAILED) (ABSENT, PENDING)
                     [ab, pe, fa]], dtype=np.uint8)  # vggish: (OK, ABSENT) (ABSENT, PENDING) (PENDING, FAILED)
    np.testing.assert_array_equal(np.asarray(heat.images[0].get_array()), want)
    assert heat.get_xlabel() == "item rows, 2 per column (the worst status shown)"


def test_worst_status_blocks_and_ragged_tail() -> None:
    st = np.array([[1], [1], [1], [2], [1], [0], [3], [1], [1], [1]], dtype=np.uint8)
    np.testing.assert_array_equal(worst_status(st, 3)[:, 0], [Status.OK, Status.PENDING, Status.FAILED,
                                                              Status.OK])
    np.testing.assert_array_equal(worst_status(st, 2)[:, 0], [1, 2, 0, 3, 1])
    assert worst_status(st, 1) is st


def test_demo_store_has_every_status(tmp_path: Path) -> None:
    s = demo_store(tmp_path / "demo.zarr", n_items=12)
    cov = s.coverage()
    assert s.n_items == 12 and s.n_captions == 24
    assert all(cov[n]["pending"] >= 1 for n in ("resnet152", "vggish", "dlib_face"))
    assert cov["resnet152"]["failed"] >= 1 and cov["vggish"]["absent"] == 2 and cov["dlib_face"]["absent"] >= 1
    assert cov["clip_text"] == {"ok": 24, "absent": 0, "failed": 0, "pending": 0}
    assert set(s.reasons("vggish")) == {"", "no_audio"}


# ---- the example notebook, executed ----
def run_notebook(monkeypatch: pytest.MonkeyPatch, out_dir: Path, store_url: str | None) -> tuple[dict[str, Any], str]:
    """Execute every code cell of docs/inspect_store.py in one namespace; return it and what the cells printed."""
    nb = jupytext.read(NOTEBOOK)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 5 and any(c.cell_type == "markdown" for c in nb.cells)
    monkeypatch.setenv("TVR_INSPECT_OUT", str(out_dir))
    if store_url is None:
        monkeypatch.delenv("TVR_STORE", raising=False)
    else:
        monkeypatch.setenv("TVR_STORE", store_url)
    monkeypatch.setattr("sys.argv", ["inspect_store.py"])
    ns: dict[str, Any] = {"__name__": "__main__"}
    buf = io.StringIO()
    with redirect_stdout(buf):
        for i, cell in enumerate(code):
            exec(compile(cell.source, f"{NOTEBOOK.name}[cell {i}]", "exec"), ns)
    return ns, buf.getvalue()


def test_notebook_runs_on_a_given_store(store: FeatureStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    ns, out = run_notebook(monkeypatch, tmp_path / "out", store.url)
    assert ns["store"].url == store.url
    assert coverage_table(store) in out  # the coverage table is shown
    assert "resnet152: failed because [('decode_error', 1), ('oom', 1)]" in out
    assert "vggish: absent because [('no_audio', 2)]" in out
    batch = ns["batch"]  # masks of the first rows of the first item feature (resnet152)
    assert ns["name"] == "resnet152"
    np.testing.assert_array_equal(batch.available, [True, True, False, False])
    np.testing.assert_array_equal(batch.mask.astype(int), [[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert "mask\n " + str(batch.mask.astype(int)) in out
    assert "fraction OK per feature: {'resnet152': 0.33, 'vggish': 0.17}" in out
    assert isinstance(ns["fig"], matplotlib.figure.Figure)
    png = tmp_path / "out" / "store_availability.png"
    assert ns["figure_path"] == png and png.read_bytes()[:4] == b"\x89PNG" and f"saved {png}" in out


def test_notebook_builds_its_own_demo_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the demo store lands in a fresh temp folder under here
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    ns, out = run_notebook(monkeypatch, tmp_path / "out", None)
    url = Path(ns["url"])
    assert url.is_relative_to(tmp_path) and (url / "zarr.json").exists()
    s = FeatureStore.open(url)
    assert s.features == ["clip_text", "dlib_face", "resnet152", "vggish"] and s.n_items == 24
    assert "failed because" in out and "absent because" in out
    assert ns["batch"].values.shape[0] == 4
    assert (tmp_path / "out" / "store_availability.png").exists()


def test_notebook_takes_store_argument(store: FeatureStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVR_STORE", str(tmp_path / "not-this-one.zarr"))
    nb_src = NOTEBOOK.read_text()
    monkeypatch.setenv("TVR_INSPECT_OUT", str(tmp_path / "out"))
    monkeypatch.setattr("sys.argv", [str(NOTEBOOK), store.url])  # `python docs/inspect_store.py STORE`
    ns: dict[str, Any] = {"__name__": "__main__"}
    with redirect_stdout(io.StringIO()):
        exec(compile(nb_src, str(NOTEBOOK), "exec"), ns)
    assert ns["store"].url == store.url and os.path.exists(tmp_path / "out" / "store_availability.png")
