"""Which differences between a feature group and a rerun make their rows incomparable (checked by the store).

`FeatureStore.ensure_feature` refuses a rerun into an existing group when its FeatureSpec (dim, max_steps,
dtype, slots, extras, ...) or any value-changing provenance key differs, naming both values. Bookkeeping keys
(tvr version, creation time, where weights were downloaded from) and options that do not change values never
count. A top-level key the stored provenance does not record at all is not compared: the group predates that
setting, and only the caller knows what was used before (pipelines/rerun.py assumes the old decode settings).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from store.schema import FeatureSpec

BOOKKEEPING_KEYS = frozenset({"tvr_version", "created", "weights_url", "precision"})  # precision: in options too
NON_VALUE_OPTIONS = frozenset({"dlib_use_cuda", "random_init"})  # recorded, but they do not change the values
NOT_RECORDED = "(not recorded)"


def plain(value: Any) -> Any:
    """JSON round trip, so tuples/lists and numpy scalars compare as they are stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flat(prov: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    """{"key" | "section.key": value} of the value-changing entries among top-level `keys`."""
    out: dict[str, Any] = {}
    for k in keys - BOOKKEEPING_KEYS:
        v = prov.get(k, NOT_RECORDED)
        if isinstance(v, Mapping) and k != "weights":  # weights: one identity, compared whole
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if not (k == "options" and kk in NON_VALUE_OPTIONS)})
        else:
            out[k] = v
    return plain(out)


def value_diffs(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key: stored X, this run Y` for every value-changing provenance entry that differs."""
    keys = set(stored)  # a top-level key the group never recorded is not compared (see the module docstring)
    old, cur = _flat(stored, keys), _flat(new, keys)
    return [f"{k}: stored {json.dumps(old.get(k, NOT_RECORDED))}, this run {json.dumps(cur.get(k, NOT_RECORDED))}"
            for k in sorted(set(old) | set(cur)) if old.get(k, NOT_RECORDED) != cur.get(k, NOT_RECORDED)]


def spec_diffs(stored: FeatureSpec, new: FeatureSpec) -> list[str]:
    """`spec.field: stored X, this run Y` for every FeatureSpec field that differs."""
    a, b = asdict(stored), asdict(new)
    return [f"spec.{f}: stored {a[f]!r}, this run {b[f]!r}" for f in a if a[f] != b[f]]
