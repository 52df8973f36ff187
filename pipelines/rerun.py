"""Reruns never mix settings: an existing store must match this run's value-changing settings and manifest.

* Settings: every frame feature records the decode settings that produced its values (``provenance["decode"]``:
  decode rate, height, frame rule) beside its extractor options (``provenance["options"]``). A rerun whose settings
  differ from the stored ones is refused, naming both, with the flags that reproduce the stored ones.
  ``FeatureStore.ensure_feature`` (store/provenance.py) refuses every value-changing difference too; this check
  runs first for the friendlier message and knows what a group from before recorded decode settings used.
* Manifest: an item whose path, kind or split changed, or a caption whose text changed, is refused with a list; with
  ``--update-manifest`` the store's tables are updated and the rows whose values depend on the change are reset to
  PENDING in every feature (status first, then the tables, so a crash in between can never leave old values marked
  done for the new file).

Comparisons are vectorised over the whole table (1M items: a hash join and elementwise compares in numpy/pandas).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TextIO

import numpy as np

from extract.sampling import DECODE_FPS
from pipelines.config import ConfigError, ExtractConfig
from pipelines.dataset import Dataset
from store.provenance import NON_VALUE_OPTIONS
from store.provenance import plain as _plain
from store.schema import FeatureSpec

DECODE_KEY = "decode"  # provenance key of the decode settings of frame features
# What tvr decoded with before it recorded decode settings (--decode-height unknown: assumed native)
LEGACY_DECODE = {"fps": DECODE_FPS, "height": None, "frame_rule": "floor"}
SHOW = 20  # changes listed in an error message; the count covers all of them


class SettingsMismatch(ConfigError):
    """A rerun would mix values made with different settings (or from a changed manifest) in one store."""


def decode_settings(cfg: ExtractConfig) -> dict[str, Any]:
    """The decode settings that change frame features' values."""
    return {"fps": DECODE_FPS, "height": cfg.decode_height, "frame_rule": cfg.frame_rule}


def with_decode(provenance: Mapping[str, Any], needs_frames: bool, cfg: ExtractConfig) -> dict[str, Any]:
    """`provenance` plus the decode settings when the feature consumes frames."""
    out = dict(provenance)
    if needs_frames:
        out[DECODE_KEY] = decode_settings(cfg)
    return out


def _settings(prov: Mapping[str, Any], decode: Mapping[str, Any] | None) -> dict[str, Any]:
    """Flat {"options.<k>" | "decode.<k>": value} of the value-changing settings in a provenance."""
    out = {f"options.{k}": v for k, v in (prov.get("options") or {}).items() if k not in NON_VALUE_OPTIONS}
    out.update({f"decode.{k}": v for k, v in (decode or {}).items()})
    return _plain(out)


def settings_diffs(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Lines `key: stored X, this run Y` for every value-changing setting that differs."""
    new_dec = new.get(DECODE_KEY)
    old_dec = stored.get(DECODE_KEY)
    legacy = new_dec is not None and old_dec is None
    old = _settings(stored, LEGACY_DECODE if legacy else old_dec)
    cur = _settings(new, new_dec)
    lines = []
    for key in sorted(set(old) | set(cur)):
        a, b = old.get(key, "(not recorded)"), cur.get(key, "(not recorded)")
        if a != b:
            note = " (assumed: the group predates recorded decode settings)" if legacy and key.startswith(
                "decode.") else ""
            lines.append(f"{key}: stored {json.dumps(a)}{note}, this run {json.dumps(b)}")
    return lines


def check_settings(store: Any, specs: Mapping[str, tuple[FeatureSpec, Mapping[str, Any]]]) -> None:
    """SettingsMismatch naming old and new values when an existing feature group was made with other settings."""
    problems: list[str] = []
    fixes: dict[str, None] = {}  # ordered set of suggestions
    for name, (_, prov) in specs.items():
        if name not in store.features:
            continue
        stored = store.provenance(name)
        diffs = settings_diffs(stored, prov)
        if not diffs:
            continue
        problems.append(f"feature '{name}':\n    " + "\n    ".join(diffs))
        old_dec = stored.get(DECODE_KEY) or (LEGACY_DECODE if DECODE_KEY in prov else {})
        fixes.update(dict.fromkeys(_fix_flags(old_dec, prov.get(DECODE_KEY) or {})))
        if any(d.startswith("options.") for d in diffs):
            fixes["the stored extractor options (extractor_options in --config)"] = None
    if problems:
        raise SettingsMismatch(
            f"{store.url} holds rows made with other value-changing settings than this run:\n  "
            + "\n  ".join(problems)
            + f"\nMixing them in one feature group is refused. Fix: rerun with {', '.join(fixes)}; or extract into "
            "a new --store (or under a new feature name).")


def _fix_flags(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Command-line settings that reproduce the stored decode settings where they differ."""
    out = []
    if _plain(stored.get("height")) != _plain(new.get("height")):
        h = stored.get("height")
        out.append(f"--decode-height {h}" if h is not None else "no --decode-height (native size)")
    if stored.get("frame_rule") != new.get("frame_rule"):
        out.append(f"--frame-rule {stored.get('frame_rule')}")
    return out


@dataclass
class ManifestChanges:
    """Rows of an existing store whose manifest entry changed, with the new values (store row order)."""

    items: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # column -> (rows, new values)
    reset_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # path/kind changed
    captions: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, object))  # text changed
    lines: list[str] = field(default_factory=list)  # the first SHOW changes, for people
    count: int = 0  # changed item fields + changed captions
    gone_items: int = 0  # stored items the manifest no longer lists (kept: tvr deletes nothing)
    gone_captions: int = 0


def _rows_in(stored_ids: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """Row of each id in `stored_ids` (-1 where absent), by hash join."""
    import pandas as pd

    return pd.Index(stored_ids.astype(object)).get_indexer(np.asarray(ids, dtype=object))


def manifest_changes(store: Any, ds: Dataset) -> ManifestChanges:
    """Compare the store's item and caption tables with the manifest, vectorised."""
    out = ManifestChanges()
    table = store.items()
    rows = _rows_in(table.id, [r.id for r in ds.items])
    known = rows >= 0
    out.gone_items = len(table.id) - int(known.sum())
    srows = rows[known]
    new_cols = {"path": [r.path for r in ds.items], "kind": [r.kind for r in ds.items],
                "split": [r.split for r in ds.items]}
    changed_reset = np.zeros(len(table.id), bool)
    for col, values in new_cols.items():
        new = np.asarray(values, dtype=object)[known]
        old = np.asarray(getattr(table, col), dtype=object)[srows]
        diff = np.flatnonzero(old != new)
        if len(diff):
            out.items[col] = (srows[diff], new[diff])
            if col != "split":  # the values depend on the file; a split is only a label
                changed_reset[srows[diff]] = True
            _describe(out, f"item {{}}: {col} {{}} -> {{}}", table.id[srows[diff]], old[diff], new[diff])
    out.reset_items = np.flatnonzero(changed_reset)
    caps = store.captions()
    crow = _rows_in(caps.id, [c.id for c in ds.captions])
    cknown = crow >= 0
    out.gone_captions = len(caps.id) - int(cknown.sum())
    ctext = np.asarray([c.text for c in ds.captions], dtype=object)[cknown]
    cold = np.asarray(caps.text, dtype=object)[crow[cknown]]
    cdiff = np.flatnonzero(cold != ctext)
    out.captions = (crow[cknown][cdiff], ctext[cdiff])
    _describe(out, "caption {}: text {} -> {}", caps.id[crow[cknown][cdiff]], cold[cdiff], ctext[cdiff])
    return out


def _describe(out: ManifestChanges, pattern: str, ids: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
    """Count the changes and keep human lines for the first SHOW of them."""
    room = max(0, SHOW - len(out.lines))
    out.lines += [pattern.format(repr(str(i)), repr(str(a)), repr(str(b)))
                  for i, a, b in zip(ids[:room], old[:room], new[:room])]
    out.count += len(ids)


def check_manifest(store: Any, ds: Dataset, *, update: bool, err: TextIO) -> ManifestChanges:
    """Refuse a changed manifest (SettingsMismatch listing the changes), or apply it when `update` is set."""
    ch = manifest_changes(store, ds)
    if ch.gone_items or ch.gone_captions:
        print(f"tvr-extract: note: {ch.gone_items} item(s) and {ch.gone_captions} caption(s) in {store.url} are "
              "not in this manifest (removed, or captions now empty); their rows are kept and not extracted",
              file=err)
    if not ch.count:
        return ch
    listing = "\n  ".join(ch.lines) + (f"\n  ... and {ch.count - len(ch.lines)} more" if ch.count > SHOW else "")
    if not update:
        raise SettingsMismatch(
            f"the manifest {ds.source!r} changed {ch.count} entr{'y' if ch.count == 1 else 'ies'} already in "
            f"{store.url}:\n  {listing}\nRows extracted from the old files/texts would be mixed with new ones. "
            "Fix: pass --update-manifest to update the store's tables and re-extract those rows, restore the old "
            "manifest, or use a new --store.")
    apply_manifest_changes(store, ch)
    print(f"tvr-extract: --update-manifest: updated {ch.count} changed entr{'y' if ch.count == 1 else 'ies'}; "
          f"{len(ch.reset_items)} item row(s) and the chunks holding {len(ch.captions[0])} caption row(s) are PENDING "
          f"again in every feature:\n  {listing}", file=err)
    return ch


def apply_manifest_changes(store: Any, ch: ManifestChanges) -> None:
    """Write the changed table values through the store, which resets the dependent rows to PENDING first.

    `FeatureStore.update_items` / `update_captions` run under the store's structural lock and reset every item
    (caption) feature's rows whose path or kind (text) changed before writing the tables, so a crash in between
    can never leave old values marked done for the new file.
    """
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(store.url, mode="r+", storage_options=store.storage_options)
    for col, (rows, values) in ch.items.items():
        fs.update_items(rows, {col: values})
    rows, texts = ch.captions
    if len(rows):
        fs.update_captions(rows, texts)
