"""Schema of a tvr feature store: statuses, feature layouts, item/caption records and per-row results."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Mapping

import numpy as np

SCHEMA_VERSION = 2  # 2: sharded arrays with a staging area (design.md §1); 1: one chunk per row, read-only
VALUE_DTYPES = ("float16", "float32", "uint8")  # uint8: raw pixels (the `frames` feature), read back as uint8
AXES = ("item", "caption")
KINDS = ("video", "image")
SPLITS = ("", "train", "val", "test")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class StoreError(Exception):
    """A store is missing, malformed, or used inconsistently; the message says what and how to fix it."""


class Status(IntEnum):
    """Per-row extraction status, stored as uint8."""

    PENDING = 0  # not attempted yet, or a writer died before finishing
    OK = 1
    ABSENT = 2  # the modality does not exist for this row (no audio, no face, an image has no motion)
    FAILED = 3


@dataclass(frozen=True)
class ExtraSpec:
    """An additional per-step array of a feature, e.g. face boxes."""

    name: str  # "box"
    shape: tuple[int, ...] = ()  # trailing shape after (row, step[, slot]), e.g. (4,)
    dtype: str = "float32"


@dataclass(frozen=True)
class FeatureSpec:
    """The on-disk layout of one feature group."""

    name: str  # group name: "resnet152", "i3d_flow", "vggish", "dlib_face", "clip", "clip_text", "glove"
    dim: int  # feature width D
    max_steps: int  # T: step axis length on disk (1 for pooled or caption-level vectors)
    dtype: str = "float16"  # values dtype, "float16", "float32" or "uint8" (pixels)
    modality: str = "appearance"  # appearance | motion | audio | face | clip | text | words
    axis: str = "item"  # "item" (one row per video/image) or "caption" (one row per caption)
    slots: int = 0  # >0: K values per step (faces); values gain a slot axis
    extras: tuple[ExtraSpec, ...] = ()
    chunk_rows: int = 1  # rows per chunk; 1 for item features so each item has one writer

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"feature name {self.name!r} must match {_NAME_RE.pattern}")
        if self.dim <= 0 or self.max_steps <= 0 or self.slots < 0 or self.chunk_rows <= 0:
            raise ValueError(f"feature {self.name!r}: dim, max_steps, chunk_rows must be > 0 and slots >= 0")
        if self.dtype not in VALUE_DTYPES:
            raise ValueError(f"feature {self.name!r}: dtype must be one of {VALUE_DTYPES}, got {self.dtype!r}")
        if self.axis not in AXES:
            raise ValueError(f"feature {self.name!r}: axis must be one of {AXES}, got {self.axis!r}")
        object.__setattr__(self, "extras", tuple(self.extras))

    def to_json(self) -> str:
        """Serialise for the group attributes."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        """Rebuild from `asdict` output (as stored in group attributes)."""
        d = dict(d)
        d["extras"] = tuple(
            ExtraSpec(name=e["name"], shape=tuple(e["shape"]), dtype=e["dtype"]) for e in d.get("extras", ())
        )
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "FeatureSpec":
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(s))

    def value_shape(self) -> tuple[int, ...]:
        """Per-row shape of `values`: (T, [K,] D)."""
        return (self.max_steps, self.slots, self.dim) if self.slots else (self.max_steps, self.dim)


def validate_id(value: str, what: str = "item id") -> str:
    """Return `value` if it is a usable id, else raise ValueError naming the problem."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if value != value.strip() or any(c in value for c in "\n\r\t\0"):
        raise ValueError(f"{what} {value!r} has leading/trailing whitespace or control characters")
    return value


@dataclass(frozen=True)
class ItemRecord:
    """One video or image."""

    id: str  # unique, non-empty, no surrounding whitespace or control characters
    path: str  # source path or URL as given by the user
    kind: str = "video"  # "video" | "image"
    duration: float = float("nan")  # seconds; 0.0 for images; NaN until known
    split: str = ""  # "train" | "val" | "test" | ""

    def __post_init__(self) -> None:
        validate_id(self.id)
        if self.kind not in KINDS:
            raise ValueError(f"item {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.split not in SPLITS:
            raise ValueError(f"item {self.id!r}: split must be one of {SPLITS}, got {self.split!r}")
        if not (math.isnan(self.duration) or self.duration >= 0):
            raise ValueError(f"item {self.id!r}: duration must be >= 0 or NaN, got {self.duration}")


@dataclass(frozen=True)
class CaptionRecord:
    """One caption of an item."""

    id: str  # unique caption id
    item: str  # ItemRecord.id it describes
    text: str

    def __post_init__(self) -> None:
        validate_id(self.id, "caption id")
        validate_id(self.item, f"item id of caption {self.id!r}")


@dataclass
class FeatureRows:
    """What an extractor returns for one row (item or caption)."""

    status: Status  # OK or ABSENT (FAILED goes through FeatureStore.write_failed)
    values: np.ndarray  # (n, D) or (n, K, D), n <= max_steps valid steps; empty when ABSENT
    times: np.ndarray  # (n,) seconds each step represents (window start for windowed features)
    mask: np.ndarray | None = None  # (n,) bool; None = all n steps valid
    slot_mask: np.ndarray | None = None  # (n, K) bool, only for slots > 0
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n, [K,] *shape)
    reason: str = ""  # short code for ABSENT: no_audio, too_short, no_face, no_motion, ...
    message: str = ""  # human-readable detail

    @classmethod
    def absent(cls, spec: FeatureSpec, reason: str, message: str = "") -> "FeatureRows":
        """An ABSENT row with empty arrays shaped for `spec`."""
        shape = (0, spec.slots, spec.dim) if spec.slots else (0, spec.dim)
        return cls(
            status=Status.ABSENT,
            values=np.zeros(shape, dtype=np.float32),
            times=np.zeros((0,), dtype=np.float32),
            reason=reason,
            message=message or reason,
        )


# --- read-side containers returned by FeatureStore ---


@dataclass
class ItemTable:
    """Item columns of a store, one numpy array per field, row order = store row order."""

    id: np.ndarray  # (N,) str (object dtype)
    path: np.ndarray  # (N,) str
    kind: np.ndarray  # (N,) str
    duration: np.ndarray  # (N,) float64
    split: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return int(self.id.shape[0])


@dataclass
class CaptionTable:
    """Caption columns of a store, row order = store caption order."""

    id: np.ndarray  # (C,) str (object dtype)
    item: np.ndarray  # (C,) int64 row into the item axis
    text: np.ndarray  # (C,) str

    def __len__(self) -> int:
        return int(self.id.shape[0])


@dataclass
class FeatureBatch:
    """Rows of one feature as read for training: values are float32 (or as stored) and padded to max_steps."""

    rows: np.ndarray  # (n,) int64 store rows, in the order requested
    values: np.ndarray  # (n, T, [K,] D) float32; the store's dtype when read with stored_dtype
    mask: np.ndarray  # (n, T) bool; False on every step of a row that is not OK
    time: np.ndarray  # (n, T) float32 seconds, NaN where no step
    status: np.ndarray  # (n,) uint8 Status codes
    available: np.ndarray  # (n,) bool = status == OK
    slot_mask: np.ndarray | None = None  # (n, T, K) bool for slot features, False where not OK
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n, T, [K,] *shape)


def bad_value_rows(values: np.ndarray, nan_only: bool = False) -> np.ndarray:
    """(n,) bool: rows of `values` (n, ...) holding a NaN (`nan_only`) or any NaN/inf value."""
    flat = values.reshape(len(values), -1)
    if flat.dtype == np.float16 and flat.shape[1]:
        # numpy's float16 isnan/isfinite are scalar loops (~20x slower than these integer ops): a float16 is
        # NaN/inf when its exponent bits are all set (magnitude bits >= 0x7C00; NaN: > 0x7C00, inf: == 0x7C00)
        top = np.bitwise_and(flat.view(np.uint16), 0x7FFF).max(axis=1)
        return top > 0x7C00 if nan_only else top >= 0x7C00
    return np.isnan(flat).any(axis=1) if nan_only else ~np.isfinite(flat).all(axis=1)


# --- on-disk layout and row validation (used by store.zarr_store) ---
STR_DTYPE = "str"  # zarr 3 variable-length UTF-8 strings
# name -> (dtype, dimension, fill value); item_id / caption_id are written last when extending.
ROOT_ARRAYS: dict[str, tuple[str, str, Any]] = {
    "item_path": (STR_DTYPE, "item", ""),
    "item_kind": (STR_DTYPE, "item", ""),
    "item_split": (STR_DTYPE, "item", ""),
    "item_duration": ("float64", "item", float("nan")),
    "item_id": (STR_DTYPE, "item", ""),
    "caption_item": ("int64", "caption", -1),
    "caption_text": (STR_DTYPE, "caption", ""),
    "caption_id": (STR_DTYPE, "caption", ""),
}


SMALL_INNER_ROWS = 256  # inner chunk rows of the small per-row arrays (mask, time, status, reason, message)
ROOT_SHARD_ROWS, ROOT_INNER_ROWS = 65536, 4096  # root tables: read whole, so bigger inner chunks
SHARD_BYTES = 64 << 20  # default target size of one values shard
INNER_BYTES = 64 << 10  # target size of one inner chunk of values (at least one row)
MIN_SHARD_ROWS, MAX_SHARD_ROWS = 256, 16384  # >= 256 keeps files/item low; <= 16384 bounds staging per shard


def inner_rows(spec: FeatureSpec) -> int:
    """Rows per inner chunk of the per-step arrays: one row for real feature sizes, more for tiny rows.

    zarr-python spends ~0.1 ms per inner chunk, so rows of a few hundred bytes are grouped up to INNER_BYTES
    (reading one row then reads at most INNER_BYTES); rows of INNER_BYTES or more keep one row per inner chunk.
    """
    row = math.prod(spec.value_shape()) * np.dtype(spec.dtype).itemsize
    return 1 << max(0, min(8, int(math.log2(max(1, INNER_BYTES // row)))))


def auto_shard_rows(spec: FeatureSpec, shard_bytes: int = SHARD_BYTES) -> int:
    """Rows per shard for `spec`: a power of two near `shard_bytes` of values, a multiple of chunk_rows."""
    row = math.prod(spec.value_shape()) * np.dtype(spec.dtype).itemsize
    s = 1 << max(0, int(math.log2(max(1, shard_bytes // row))))
    s = min(MAX_SHARD_ROWS, max(MIN_SHARD_ROWS, s))
    return -(-s // spec.chunk_rows) * spec.chunk_rows


def feature_arrays(spec: FeatureSpec, rows: int, shard_rows: int | None = None) -> dict[str, dict[str, Any]]:
    """The arrays of a feature group: name -> create_array kwargs (shape, chunks, [shards,] dtype, dims, fill).

    `shard_rows=None` is the v1 layout (one chunk of chunk_rows rows, no sharding); otherwise v2: shards of
    `shard_rows` rows, inner chunks of `inner_rows(spec)` rows (one row once a row is 64 KiB) for the per-step
    data and of SMALL_INNER_ROWS for the rest.
    v2 `values` use NaN as fill value so a lost chunk or shard never reads as valid zeros.
    """
    n, c = spec.name, spec.chunk_rows
    big_inner = c if shard_rows is None else math.gcd(shard_rows, inner_rows(spec))
    small_inner = c if shard_rows is None else math.gcd(shard_rows, SMALL_INNER_ROWS)
    row, step = spec.axis, f"{n}_step"
    slot = (f"{n}_slot",) if spec.slots else ()
    k = (spec.slots,) if spec.slots else ()
    t = spec.max_steps
    small = {"compressors": None}  # tiny chunks: compression costs more than it saves (and enables fast scans)
    # zstd level 1 packs float16 features as tightly as zarr's default level 3 at about a third of the encode time
    big = {"compressors": [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]}
    # float feature values are stored raw: zstd saves ~8% of their bytes (float mantissas are noise) but decoding
    # it (~1 GB/s) cost more CPU per training pair than the whole in-memory cached path, so streamed training read
    # at ~0.5x of it; raw chunks are used in place by store._shard_io (uint8 frames, which compress, keep zstd)
    values_codec = {"compressors": None} if spec.dtype in ("float16", "float32") else big

    def arr(trail: tuple[int, ...], dtype: str, dims: tuple[str, ...], fill: Any, inner: int,
            codec: dict[str, Any]) -> dict[str, Any]:
        kw = dict(shape=(rows, *trail), chunks=(inner, *trail), dtype=dtype, dimension_names=(row, *dims),
                  fill_value=fill, **codec)
        if shard_rows is not None:
            kw["shards"] = (shard_rows, *trail)
        return kw

    # uint8 has no NaN: a lost uint8 values shard cannot be told from black pixels by its fill value
    vfill = 0 if shard_rows is None or spec.dtype == "uint8" else float("nan")
    out: dict[str, dict[str, Any]] = {
        "values": arr((t, *k, spec.dim), spec.dtype, (step, *slot, f"{n}_dim"), vfill, big_inner, values_codec),
        "mask": arr((t,), "bool", (step,), False, small_inner, small),
        "time": arr((t,), "float32", (step,), float("nan"), small_inner, small),
    }
    if spec.slots:
        out["slot_mask"] = arr((t, *k), "bool", (step, *slot), False, big_inner, small)
    for e in spec.extras:
        tail = tuple(f"{n}_{e.name}" if len(e.shape) == 1 else f"{n}_{e.name}_{i}" for i in range(len(e.shape)))
        out[f"extra_{e.name}"] = arr((t, *k, *e.shape), e.dtype, (step, *slot, *tail), 0, big_inner, big)
    for name, dtype, fill in (("status", "uint8", 0), ("reason", STR_DTYPE, ""), ("message", STR_DTYPE, "")):
        out[name] = arr((), dtype, (), fill, small_inner, small)
    return out


def codec_problem(meta: Mapping[str, Any]) -> str | None:
    """Why an array's raw metadata is refused (pickle/object codecs, sharding, Zarr v2), or None."""
    text = json.dumps(meta).lower()
    if "pickle" in text:
        return "uses the pickle codec (unpickling runs arbitrary code)"
    if meta.get("zarr_format") == 2:
        if "|o" in str(meta.get("dtype", "")).lower():
            return "has an object dtype (Zarr v2 '|O')"
        return "is a Zarr v2 array (tvr stores are Zarr v3 only)"
    dtype = meta.get("data_type")
    dname = dtype.get("name") if isinstance(dtype, Mapping) else dtype
    if str(dname).lower() in ("object", "|o", "o"):
        return "has an object data type"
    return None


_EXP_BITS = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def _all_finite(a: np.ndarray) -> bool:
    """No NaN/inf in a float array, from the exponent bits (integer ops: several times faster for float16)."""
    if not a.size or a.dtype.kind != "f":  # integer values (uint8 frames) are always finite
        return True
    utype, exp = _EXP_BITS[a.dtype.itemsize]
    bits = np.ascontiguousarray(a).view(utype) & utype(exp)
    return int(bits.max()) != exp  # only NaN/inf have every exponent bit set


def pad_row(spec: FeatureSpec, row: int, r: FeatureRows) -> dict[str, Any]:
    """Validate one FeatureRows against `spec` and pad it to max_steps; error messages name feature and row."""
    where = f"feature '{spec.name}' row {row}"
    if not isinstance(r, FeatureRows):
        raise StoreError(f"{where}: expected FeatureRows, got {type(r).__name__}")
    status = Status(r.status)
    if status not in (Status.OK, Status.ABSENT):
        raise StoreError(f"{where}: FeatureRows.status must be OK or ABSENT (use write_failed for FAILED), "
                         f"got {status.name}")
    t, k, d = spec.max_steps, spec.slots, spec.dim
    vals = np.asarray(r.values)
    n = vals.shape[0] if vals.ndim else 0
    want = "(n, K, D)" if k else "(n, D)"
    if vals.ndim != (3 if k else 2) or vals.shape[1:] != ((k, d) if k else (d,)) or n > t:
        raise StoreError(f"{where}: values have shape {vals.shape}, expected {want} with n <= max_steps={t}"
                         + (f", K={k}" if k else "") + f", D={d}")
    if status is Status.OK and n == 0:
        raise StoreError(f"{where}: an OK row needs at least one step; return ABSENT with a reason instead")
    times = np.asarray(r.times, dtype=np.float32).reshape(-1)
    if times.shape != (n,):
        raise StoreError(f"{where}: times have shape {np.shape(r.times)}, expected ({n},)")
    mask = np.ones(n, bool) if r.mask is None else np.asarray(r.mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise StoreError(f"{where}: mask must be bool of shape ({n},), got {mask.dtype} {mask.shape}")
    out: dict[str, Any] = {}
    if n == t:  # a full row: no zero fill, and no copy when it has the stored dtype (it is serialised at once)
        v = np.ascontiguousarray(vals, dtype=spec.dtype)
    else:
        v = np.zeros((t, *vals.shape[1:]), dtype=spec.dtype)
        v[:n] = vals
    head = v[:n]
    if not _all_finite(head):  # rare: find where, so only invalid steps may hold NaN/inf
        if v is vals:
            v = v.copy()  # never modify the caller's array
            head = v[:n]
        bad = ~np.isfinite(head)
        if bad[mask].any():
            raise StoreError(f"{where}: values contain NaN/inf on valid steps (or overflow {spec.dtype})")
        head[bad] = 0  # NaN on disk means lost data (v2 fill value), so invalid steps hold zeros
    if status is Status.OK and not mask.any():
        raise StoreError(f"{where}: an OK row needs at least one valid (mask=True) step; return ABSENT instead")
    out["values"] = v
    out["mask"] = np.zeros(t, bool)
    out["mask"][:n] = mask
    out["time"] = np.full(t, np.nan, np.float32)
    out["time"][:n] = times
    if k:
        sm = np.ones((n, k), bool) if r.slot_mask is None else np.asarray(r.slot_mask)
        if sm.shape != (n, k) or sm.dtype != bool:
            raise StoreError(f"{where}: slot_mask must be bool of shape ({n}, {k}), got {sm.dtype} {sm.shape}")
        out["slot_mask"] = np.zeros((t, k), bool)
        out["slot_mask"][:n] = sm
    elif r.slot_mask is not None:
        raise StoreError(f"{where}: slot_mask given but the feature has no slots")
    unknown = set(r.extras) - {e.name for e in spec.extras}
    if unknown:
        raise StoreError(f"{where}: unknown extras {sorted(unknown)}; the spec has {[e.name for e in spec.extras]}")
    for e in spec.extras:
        shape = (n, *((k,) if k else ()), *e.shape)
        x = np.zeros((t, *shape[1:]), dtype=e.dtype)
        if e.name in r.extras:
            got = np.asarray(r.extras[e.name])
            if got.shape != shape:
                raise StoreError(f"{where}: extra '{e.name}' has shape {got.shape}, expected {shape}")
            x[:n] = got
        elif status is Status.OK:
            raise StoreError(f"{where}: extra '{e.name}' is missing from an OK row")
        out[f"extra_{e.name}"] = x
    out["reason"] = r.reason or ("" if status is Status.OK else "absent")
    out["message"] = r.message
    out["status"] = np.uint8(status)
    return out
