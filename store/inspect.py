"""Notebook and CLI helpers over a FeatureStore: coverage table, failure reasons, availability figure, xarray views."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from store.schema import CaptionRecord, ExtraSpec, FeatureRows, FeatureSpec, ItemRecord, Status
from store.zarr_store import FeatureStore

STATUS_COLORS = {  # pending grey, ok green, absent amber, failed red
    Status.PENDING: "#c8c8c8",
    Status.OK: "#2ca02c",
    Status.ABSENT: "#ffbf3f",
    Status.FAILED: "#d62728",
}
_ORDER = (Status.OK, Status.ABSENT, Status.FAILED, Status.PENDING)


def _scan(store: FeatureStore, feature: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(status per row, row count per status code, reason per row) of `feature`, from one status read."""
    st = store.status(feature)
    return st, np.bincount(st, minlength=4), store.reasons(feature, st)


def _top(st: np.ndarray, reasons: np.ndarray, status: Status, top: int | None) -> list[tuple[str, int]]:
    """Most common reasons among the rows with `status`, most frequent first."""
    return Counter(reasons[st == status].tolist()).most_common(top)


def reason_counts(store: FeatureStore, feature: str, status: Status = Status.FAILED,
                  top: int | None = None) -> list[tuple[str, int]]:
    """Most common reasons among rows of `feature` with `status` (FAILED or ABSENT), most frequent first."""
    st, _, reasons = _scan(store, feature)
    return _top(st, reasons, status, top)


def summary(store: FeatureStore, top: int = 5) -> dict[str, Any]:
    """The `tvr-store info --json` document.

    ``{"items": N, "features": {name: {"ok": n, "absent": n, "failed": n, "pending": n}},
    "failure_reasons": {name: [{"reason": r, "count": n}, ...]}}``; reasons are the `top` most common among FAILED
    rows, most frequent first, and every feature has an entry (an empty list when nothing failed).
    """
    features: dict[str, dict[str, int]] = {}
    failures: dict[str, list[dict[str, Any]]] = {}
    for name in store.features:
        st, counts, reasons = _scan(store, name)
        features[name] = {s.name.lower(): int(counts[s]) for s in _ORDER}
        failures[name] = [{"reason": r, "count": n} for r, n in _top(st, reasons, Status.FAILED, top)]
    return {"items": store.n_items, "features": features, "failure_reasons": failures}


def coverage_table(store: FeatureStore, top: int = 3) -> str:
    """Plain-text table: one line per feature with OK/ABSENT/FAILED/PENDING counts and top reasons."""
    head = f"{'feature':<16} {'modality':<10} {'axis':<7} {'rows':>7} {'ok':>7} {'absent':>7} {'failed':>7} " \
           f"{'pending':>7}  top reasons"
    lines = [f"store: {store.url}  items: {store.n_items}  captions: {store.n_captions}", head, "-" * len(head)]
    for name in store.features:
        spec = store.spec(name)
        st, counts, reasons = _scan(store, name)
        why = [f"{s.name.lower()}:{r}={n}" for s in (Status.FAILED, Status.ABSENT)
               for r, n in _top(st, reasons, s, top)]
        lines.append(f"{name:<16} {spec.modality:<10} {spec.axis:<7} {st.shape[0]:>7} {counts[Status.OK]:>7} "
                     f"{counts[Status.ABSENT]:>7} {counts[Status.FAILED]:>7} {counts[Status.PENDING]:>7}  "
                     f"{', '.join(why) or '-'}")
    if not store.features:
        lines.append("(no features yet)")
    return "\n".join(lines)


def status_dataarray(store: FeatureStore) -> Any:
    """xarray DataArray (item, feature) of status codes for item-axis features, with item ids as coordinate."""
    import xarray as xr

    names = [n for n in store.features if store.spec(n).axis == "item"]
    data = np.stack([store.status(n) for n in names], axis=1) if names else np.zeros((store.n_items, 0), np.uint8)
    return xr.DataArray(data, dims=("item", "feature"),
                        coords={"item": store.items().id.astype(str), "feature": names},
                        attrs={"flag_values": [int(s) for s in Status],
                               "flag_meanings": " ".join(s.name.lower() for s in Status)})


def worst_status(status: np.ndarray, step: int) -> np.ndarray:
    """(N, F) status codes -> (ceil(N/step), F): per block of `step` rows the worst, FAILED > PENDING > ABSENT > OK.

    Plain subsampling would hide a lone failure among thousands of rows; the worst-of-block keeps it visible.
    """
    if step == 1 or not status.size:
        return status
    rank = np.array([2, 0, 1, 3], dtype=np.uint8)  # rank by status code: PENDING 2, OK 0, ABSENT 1, FAILED 3
    pad = -len(status) % step
    ranked = np.pad(rank[status], ((0, pad), (0, 0)))  # padding ranks as OK, so it never wins
    worst = ranked.reshape(-1, step, status.shape[1]).max(axis=1)
    return np.argsort(rank)[worst].astype(np.uint8)


def availability_figure(store: FeatureStore, max_items: int = 400) -> Any:
    """Matplotlib Figure: items x features status heat-map (item-axis features) and per-feature status bars."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    da = status_dataarray(store)
    names = store.features
    fig = Figure(figsize=(11, 4.5), constrained_layout=True)
    heat, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    cmap = ListedColormap([STATUS_COLORS[s] for s in Status])
    norm = BoundaryNorm(np.arange(len(Status) + 1) - 0.5, cmap.N)
    data = da.values
    step = max(1, -(-data.shape[0] // max_items))  # one column per `step` rows so huge stores stay legible
    shown = worst_status(data, step)
    heat.imshow(shown.T if shown.size else np.zeros((1, 1)), aspect="auto", interpolation="nearest",
                cmap=cmap, norm=norm)
    heat.set_yticks(range(data.shape[1]),
                    [f"{n} ({store.spec(n).modality})" for n in da.coords["feature"].values])
    heat.set_xlabel("item row" if step == 1 else f"item rows, {step} per column (the worst status shown)")
    heat.set_title("status per item and feature")
    counts = store.coverage()
    left = np.zeros(len(names))
    for s in _ORDER:
        vals = np.array([counts[n][s.name.lower()] for n in names], dtype=float)
        bars.barh(range(len(names)), vals, left=left, color=STATUS_COLORS[s], label=s.name.lower())
        left += vals
    bars.set_yticks(range(len(names)), [f"{n} [{store.spec(n).axis}]" for n in names])
    bars.invert_yaxis()
    bars.set_xlabel("rows")
    bars.set_title("rows per status")
    fig.legend(handles=[Patch(color=STATUS_COLORS[s], label=s.name.lower()) for s in _ORDER],
               loc="outside lower center", ncols=4)
    return fig


def demo_store(path: str | os.PathLike, n_items: int = 24, seed: int = 0) -> FeatureStore:
    """Build a small store with random features, some ABSENT and FAILED rows, for examples and tests."""
    rng = np.random.default_rng(seed)
    items = [ItemRecord(f"video{i:03d}", f"/data/video{i:03d}.mp4", kind="video" if i % 6 else "image",
                        duration=0.0 if i % 6 == 0 else float(rng.uniform(2, 30)),
                        split=("train", "val", "test")[i % 3]) for i in range(n_items)]
    captions = [CaptionRecord(f"{it.id}#{j}", it.id, f"caption {j} of {it.id}") for it in items for j in range(2)]
    store = FeatureStore.create(path, items, captions, overwrite=True)
    specs = [FeatureSpec("resnet152", 32, 8, modality="appearance"),
             FeatureSpec("vggish", 16, 8, modality="audio"),
             FeatureSpec("dlib_face", 8, 4, slots=2, modality="face", extras=(ExtraSpec("box", (4,)),)),
             FeatureSpec("clip_text", 12, 1, dtype="float32", modality="text", axis="caption", chunk_rows=16)]
    for spec in specs:
        store.ensure_feature(spec, {"weights": {"random": True, "seed": seed}, "preset": "demo", "variant": "demo"})
    for row, it in enumerate(items):
        if row % 7 == 5:
            continue  # left PENDING, as if no worker got to it yet
        for spec in specs[:3]:
            if spec.name == "vggish" and it.kind == "image":
                store.write(spec.name, row, FeatureRows.absent(spec, "no_audio", "images have no audio"))
            elif spec.name == "dlib_face" and row % 4 == 1:
                store.write(spec.name, row, FeatureRows.absent(spec, "no_face"))
            elif spec.name == "resnet152" and row % 11 == 3:
                store.write_failed(spec.name, row, "decode_error", "corrupt stream at 1.2 s")
            else:
                n = int(rng.integers(1, spec.max_steps + 1))
                shape = (n, spec.slots, spec.dim) if spec.slots else (n, spec.dim)
                extras = {"box": rng.uniform(0, 100, (n, spec.slots, 4))} if spec.slots else {}
                store.write(spec.name, row, FeatureRows(Status.OK, rng.standard_normal(shape), np.arange(n) * 0.5,
                                                        extras=extras))
    text = specs[3]
    for start in range(0, len(captions), text.chunk_rows):
        block = [FeatureRows(Status.OK, rng.standard_normal((1, text.dim)), np.zeros(1))
                 for _ in range(min(text.chunk_rows, len(captions) - start))]
        store.write_block(text.name, start, block)
    store.pack_ready(partial=True)  # a finished store: everything packed, as after tvr-extract
    return store


def feature_frame(store: FeatureStore, feature: str, rows: Sequence[int]) -> Any:
    """Small xarray Dataset of selected rows, loaded into memory, for printing in notebooks (staged rows included)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*staged rows that xarray does not see")
        ds = store.to_xarray(feature)
    ds = ds.isel({store.spec(feature).axis: list(rows)}).load()
    if not store.staged_count(feature):
        return ds
    idx = np.asarray(rows, dtype=np.int64)
    got = store._read_rows(feature, idx, idx, list(ds.data_vars))  # packed rows merged with staged ones
    return ds.assign({k: (ds[k].dims, got[k].astype(str) if ds[k].dtype.kind in "OTU" else got[k].astype(ds[k].dtype))
                      for k in ds.data_vars})
