"""Multiple-choice question sets of a store (LSMDC-style): written and read through FeatureStore, by id.

One set per store. Question q asks which of `captions[q]` describes item `item[q]`; `answer[q]` is the index of
the true option (a caption of that item). Callers give ids; the store keeps rows, which never change (items and
captions are only appended), as three int arrays in the group `_choices/<set id>/`: `item` (question,),
`captions` (question, option) and `answer` (question,), chunked and sharded like the root tables, so a million
questions are a few shard objects and never a large zarr.json. The root attribute `tvr_choices` names the current
set's group (`{"format": 2, "group", "questions", "options"}`); it is switched in one metadata write after the
arrays are complete, so a crash leaves the old set, and superseded groups are deleted afterwards.
Stores written before held the set itself in that attribute (`{"item": [id, ...], "captions": [[id, ...], ...],
"answer": [int, ...]}`); they still read. Ids are mapped to rows with one sort + binary search.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from store._zarr_io import _listdir
from store.schema import ROOT_INNER_ROWS, ROOT_SHARD_ROWS, StoreError

CHOICES_ATTR = "tvr_choices"  # root attribute; the same key as stores written before this API existed
CHOICES_GROUP = "_choices"  # root group of the sets' arrays; feature names never start with '_'
FORMAT = 2  # CHOICES_ATTR as a pointer to arrays (1: the set itself, as JSON)
SHOWN = 5  # ids named in an error message
_FIX = "rewrite it with FeatureStore.set_choices"


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
        missing = list(dict.fromkeys(flat[~found][:1000].tolist()))
        raise StoreError(f"{where}: {int((~found).sum())} {what} id(s) of the multiple-choice set are not in the "
                         f"store, e.g. {missing[:SHOWN]}; add those items/captions first or drop those questions")
    return order[pos].astype(np.int64).reshape(wanted.shape)


def _answers(answer: Sequence[int] | np.ndarray, n_opts: int, where: str) -> np.ndarray:
    """Answer indices as int64; StoreError for non-integers or indices outside the options."""
    ans = np.asarray(answer)
    if ans.dtype.kind not in "iu":
        try:
            ans = np.asarray([int(a) for a in answer], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{where}: multiple-choice answers must be option indices ({exc})") from None
    ans = ans.astype(np.int64).reshape(-1)
    bad = np.flatnonzero((ans < 0) | (ans >= n_opts))
    if len(bad):
        raise StoreError(f"{where}: multiple-choice answer(s) outside 0..{n_opts - 1} at question(s) "
                         f"{bad[:SHOWN].tolist()}")
    return ans


def _parse(item_ids: Sequence[str], caption_ids: Sequence[Sequence[str]], answer: Sequence[int],
           where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of one question set; StoreError when the lengths or option counts do not line up."""
    n = len(item_ids)
    if n == 0 or len(caption_ids) != n or len(answer) != n:
        raise StoreError(f"{where}: a multiple-choice set needs one option list and one answer per question, got "
                         f"{n} item(s), {len(caption_ids)} option list(s), {len(answer)} answer(s)")
    try:
        caps = np.asarray(caption_ids)
    except ValueError:  # ragged option lists
        caps = np.empty(0)
    if caps.ndim != 2 or caps.shape[1] < 2:
        n_opts = {len(opts) for opts in caption_ids}  # the error path only: one pass to name the counts
        raise StoreError(f"{where}: every multiple-choice question needs the same number (>= 2) of options, got "
                         f"{sorted(n_opts)[:SHOWN]}")
    items = np.asarray(item_ids).reshape(-1).astype(str)
    return items, caps.astype(str), _answers(answer, caps.shape[1], where)


class ChoicesMixin:
    """The multiple-choice set of FeatureStore (uses its root tables, root attributes, lock and url)."""

    url: str
    mode: str
    _g: zarr.Group
    _root: dict[str, zarr.Array]

    def set_choices(self, item_ids: Sequence[str], caption_ids: Sequence[Sequence[str]],
                    answer: Sequence[int]) -> None:
        """Store the multiple-choice set (replacing any earlier one) after checking every id and answer."""
        self._require_write()
        with self._lock("structure", "structural (multiple-choice set)"):
            self._reload()  # ids appended by another driver since we opened count as known
            items, caps, ans = _parse(item_ids, caption_ids, answer, self.url)
            self._put_set(self._choice_rows(items, caps, ans))

    def set_choice_rows(self, mc: ChoiceSet) -> None:
        """Store a multiple-choice set given as store rows (copies, or sets built from row arrays at scale)."""
        self._require_write()
        with self._lock("structure", "structural (multiple-choice set)"):
            self._reload()
            q = {"group": "given rows", "questions": len(mc.answer), "options": mc.captions.shape[-1]}
            self._put_set(self._valid_rows(ChoiceSet(*(np.asarray(a, dtype=np.int64) for a in
                                                       (mc.items, mc.captions, mc.answer))), q))

    def _put_set(self, mc: ChoiceSet) -> None:
        """Write a checked set's arrays, switch the pointer attribute to them, then delete older sets."""
        name = f"{CHOICES_GROUP}/{uuid.uuid4().hex}"
        self._write_set(name, mc)
        self._g.attrs[CHOICES_ATTR] = {"format": FORMAT, "group": name, "questions": len(mc.answer),
                                       "options": int(mc.captions.shape[1])}  # the switch: one metadata write
        self._drop_sets(keep=name)

    def choices(self) -> ChoiceSet | None:
        """The multiple-choice set as store rows, or None when the store has none; StoreError when it is damaged."""
        q = self._g.attrs.get(CHOICES_ATTR)
        if not q:
            return None
        if isinstance(q, dict) and q.get("format") == FORMAT:
            return self._read_set(q)
        where = f"{self.url}: root attribute '{CHOICES_ATTR}'"
        if not isinstance(q, dict) or not {"item", "captions", "answer"} <= set(q):
            raise StoreError(f"{where} is malformed (needs 'item', 'captions', 'answer'); {_FIX}")
        try:
            items, caps, ans = _parse(q["item"], q["captions"], q["answer"], where)
        except TypeError as exc:
            raise StoreError(f"{where} is malformed ({exc}); {_FIX}") from None
        return self._choice_rows(items, caps, ans)

    def choices_info(self) -> dict[str, Any] | None:
        """Size of the multiple-choice set without reading it: questions, options, storage, bytes; None if none."""
        q = self._g.attrs.get(CHOICES_ATTR)
        if not q or not isinstance(q, dict):
            return None
        if q.get("format") == FORMAT:
            try:
                arrays = self._set_arrays(q)
                size = sum(int(a.nbytes_stored()) for a in arrays.values())
            except StoreError:
                size = None
            return {"questions": q.get("questions"), "options": q.get("options"), "storage": q.get("group"),
                    "bytes": size}
        caps = q.get("captions") or [[]]
        return {"questions": len(q.get("item") or ()), "options": len(caps[0]) if isinstance(caps[0], list) else None,
                "storage": f"root attribute '{CHOICES_ATTR}'", "bytes": None}

    def _choice_rows(self, items: np.ndarray, caps: np.ndarray, ans: np.ndarray) -> ChoiceSet:
        """Rows of a parsed set; StoreError for unknown ids or a true option that is not a caption of its item."""
        item_rows = _rows_of(self._read_str("item_id"), items, self.url, "item")
        cap_rows = _rows_of(self._read_str("caption_id"), caps, self.url, "caption")
        return self._checked(ChoiceSet(item_rows, cap_rows, ans), lambda wrong: items[wrong].tolist())

    def _checked(self, mc: ChoiceSet, name_items: Callable[[np.ndarray], list[Any]]) -> ChoiceSet:
        """`mc` when every true option is a caption of its question's item; StoreError naming some that are not."""
        owner = np.asarray(self._root["caption_item"][:], dtype=np.int64)
        true_caps = mc.captions[np.arange(len(mc.answer)), mc.answer]
        wrong = np.flatnonzero(owner[true_caps] != mc.items)
        if len(wrong):
            raise StoreError(f"{self.url}: in {len(wrong)} multiple-choice question(s) the true option is not a "
                             f"caption of the question's item, e.g. items {name_items(wrong[:SHOWN])}; fix "
                             "their answer indices")
        return mc

    def _group_path(self, name: str) -> str:
        """Store key of a group below the store's root group."""
        return f"{self._g.path}/{name}" if self._g.path else name

    def _write_set(self, name: str, mc: ChoiceSet) -> None:
        """Write a set's arrays into a new group (not yet the current set)."""
        g = zarr.open_group(store=self._g.store, path=self._group_path(name), mode="w", zarr_format=3)
        n_opts = mc.captions.shape[1]
        for key, data, dims in (("item", mc.items, ("question",)), ("captions", mc.captions, ("question", "option")),
                                ("answer", mc.answer, ("question",))):
            a = g.create_array(key, shape=data.shape, dtype="int64", chunks=(ROOT_INNER_ROWS, *data.shape[1:]),
                               shards=(ROOT_SHARD_ROWS, *data.shape[1:]), dimension_names=dims, fill_value=-1)
            a[...] = data
        g.attrs.update({"questions": len(mc.answer), "options": n_opts})

    def _drop_sets(self, keep: str) -> None:
        """Delete every set group but `keep` (superseded, or left by a crashed set_choices)."""
        base = self._group_path(CHOICES_GROUP)
        for child in _listdir(self._g.store, base):
            if child != "zarr.json" and f"{CHOICES_GROUP}/{child}" != keep:
                sync(self._g.store.delete_dir(f"{base}/{child}"))

    def _set_arrays(self, q: dict[str, Any]) -> dict[str, zarr.Array]:
        """The arrays of the set the pointer attribute `q` names; StoreError when they are missing."""
        name = str(q.get("group", ""))
        try:
            g = zarr.open_group(store=self._g.store, path=self._group_path(name), mode="r")
            return {k: g[k] for k in ("item", "captions", "answer")}  # type: ignore[misc]
        except Exception as e:  # zarr raises several types for a missing node
            raise StoreError(f"{self.url}: the multiple-choice set '{name}' cannot be opened ({type(e).__name__}: "
                             f"{e}); it was replaced since this store was opened (reopen it) or is damaged "
                             f"({_FIX})") from e

    def _read_set(self, q: dict[str, Any]) -> ChoiceSet:
        """The arrays-backed set the pointer attribute `q` names, checked."""
        arrays = self._set_arrays(q)
        return self._valid_rows(ChoiceSet(*(np.asarray(arrays[k][...], dtype=np.int64)
                                            for k in ("item", "captions", "answer"))), q)

    def _valid_rows(self, mc: ChoiceSet, q: dict[str, Any]) -> ChoiceSet:
        """`mc` when its shapes are `q`'s, its rows in the store and its true options of their items."""
        n_q, n_opts = q.get("questions"), q.get("options")
        where = f"{self.url}: multiple-choice set '{q.get('group')}'"
        shapes = (mc.items.shape, mc.captions.shape, mc.answer.shape)
        if shapes != ((n_q,), (n_q, n_opts), (n_q,)) or not n_q or int(n_opts or 0) < 2:
            raise StoreError(f"{where} has shapes {shapes}, expected {n_q} (> 0) question(s) of {n_opts} (>= 2) "
                             f"option(s); {_FIX}")
        n_items, n_caps = self._root["item_id"].shape[0], self._root["caption_id"].shape[0]
        out = (mc.items < 0) | (mc.items >= n_items) | ((mc.captions < 0) | (mc.captions >= n_caps)).any(axis=1)
        if out.any():
            raise StoreError(f"{where}: question(s) {np.flatnonzero(out)[:SHOWN].tolist()} refer to rows outside "
                             f"the store's {n_items} items / {n_caps} captions; {_FIX}")
        _answers(mc.answer, int(n_opts), where)
        return self._checked(mc, lambda wrong: mc.items[wrong].tolist())
