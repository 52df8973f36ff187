"""Multiple-choice question sets of a store (LSMDC-style): written and read through FeatureStore, by id.

One set per store, kept in the root attribute `tvr_choices` = `{"item": [item id, ...], "captions": [[caption id,
...], ...], "answer": [int, ...]}`: question q asks which of `captions[q]` describes item `item[q]`, and
`answer[q]` is the index of the true option (a caption of that item). Ids, not rows, so the set stays valid when
items are appended. Readers get store rows (`ChoiceSet`); ids are mapped with one sort + binary search, no
per-id dictionary.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.schema import StoreError

CHOICES_ATTR = "tvr_choices"  # root attribute; the same key as stores written before this API existed
SHOWN = 5  # ids named in an error message


@dataclass
class ChoiceSet:
    """Multiple-choice questions by store row: video item rows, option caption rows, index of the true option."""

    items: np.ndarray  # (Q,) int64 item rows
    captions: np.ndarray  # (Q, n_options) int64 caption rows
    answer: np.ndarray  # (Q,) int64 index into captions[q]


def _rows_of(table: np.ndarray, wanted: np.ndarray, where: str, what: str) -> np.ndarray:
    """Rows of `wanted` ids in the id column `table`; StoreError naming the unknown ones."""
    keys = table.astype(str)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    flat = wanted.reshape(-1)
    pos = np.minimum(np.searchsorted(sorted_keys, flat), max(len(keys) - 1, 0))
    found = sorted_keys[pos] == flat if len(keys) else np.zeros(len(flat), dtype=bool)
    if not found.all():
        missing = list(dict.fromkeys(flat[~found].tolist()))
        raise StoreError(f"{where}: {len(missing)} {what} id(s) of the multiple-choice set are not in the store, "
                         f"e.g. {missing[:SHOWN]}; add those items/captions first or drop those questions")
    return order[pos].astype(np.int64).reshape(wanted.shape)


def _parse(item_ids: Sequence[str], caption_ids: Sequence[Sequence[str]], answer: Sequence[int],
           where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of one question set; StoreError when the lengths or option counts do not line up."""
    items = np.asarray([str(i) for i in item_ids])
    n_opts = {len(opts) for opts in caption_ids}
    if len(items) == 0 or len(caption_ids) != len(items) or len(answer) != len(items):
        raise StoreError(f"{where}: a multiple-choice set needs one option list and one answer per question, got "
                         f"{len(items)} item(s), {len(caption_ids)} option list(s), {len(answer)} answer(s)")
    if len(n_opts) != 1 or min(n_opts) < 2:
        raise StoreError(f"{where}: every multiple-choice question needs the same number (>= 2) of options, got "
                         f"{sorted(n_opts)[:SHOWN]}")
    caps = np.asarray([[str(c) for c in opts] for opts in caption_ids])
    try:
        ans = np.asarray([int(a) for a in answer], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where}: multiple-choice answers must be option indices ({exc})") from None
    bad = np.flatnonzero((ans < 0) | (ans >= caps.shape[1]))
    if len(bad):
        raise StoreError(f"{where}: multiple-choice answer(s) outside 0..{caps.shape[1] - 1} at question(s) "
                         f"{bad[:SHOWN].tolist()}")
    return items, caps, ans


class ChoicesMixin:
    """The multiple-choice set of FeatureStore (uses its root tables, root attributes, lock and url)."""

    url: str
    _g: Any
    _root: dict[str, Any]

    def set_choices(self, item_ids: Sequence[str], caption_ids: Sequence[Sequence[str]],
                    answer: Sequence[int]) -> None:
        """Store the multiple-choice set (replacing any earlier one) after checking every id and answer."""
        self._require_write()
        with self._lock("structure", "structural (multiple-choice set)"):
            self._reload()  # ids appended by another driver since we opened count as known
            items, caps, ans = _parse(item_ids, caption_ids, answer, self.url)
            self._choice_rows(items, caps, ans)
            self._g.attrs[CHOICES_ATTR] = {"item": items.tolist(), "captions": caps.tolist(),
                                           "answer": ans.tolist()}

    def choices(self) -> ChoiceSet | None:
        """The multiple-choice set as store rows, or None when the store has none; StoreError when it is damaged."""
        q = self._g.attrs.get(CHOICES_ATTR)
        if not q:
            return None
        where = f"{self.url}: root attribute '{CHOICES_ATTR}'"
        if not isinstance(q, dict) or not {"item", "captions", "answer"} <= set(q):
            raise StoreError(f"{where} is malformed (needs 'item', 'captions', 'answer'); rewrite it with "
                             "FeatureStore.set_choices")
        try:
            items, caps, ans = _parse(q["item"], q["captions"], q["answer"], where)
        except TypeError as exc:
            raise StoreError(f"{where} is malformed ({exc}); rewrite it with FeatureStore.set_choices") from None
        return self._choice_rows(items, caps, ans)

    def _choice_rows(self, items: np.ndarray, caps: np.ndarray, ans: np.ndarray) -> ChoiceSet:
        """Rows of a parsed set; StoreError for unknown ids or a true option that is not a caption of its item."""
        item_rows = _rows_of(self._read_str("item_id"), items, self.url, "item")
        cap_rows = _rows_of(self._read_str("caption_id"), caps, self.url, "caption")
        owner = np.asarray(self._root["caption_item"][:], dtype=np.int64)
        true_caps = cap_rows[np.arange(len(ans)), ans]
        wrong = np.flatnonzero(owner[true_caps] != item_rows)
        if len(wrong):
            raise StoreError(f"{self.url}: in {len(wrong)} multiple-choice question(s) the true option is not a "
                             f"caption of the question's item, e.g. items {items[wrong[:SHOWN]].tolist()}; fix "
                             "their answer indices")
        return ChoiceSet(item_rows, cap_rows, ans)
