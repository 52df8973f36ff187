"""Schema of a tvr feature store: statuses, feature layouts, item/caption records and per-row results."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Mapping

import numpy as np

SCHEMA_VERSION = 1
VALUE_DTYPES = ("float16", "float32")
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
    dtype: str = "float16"  # values dtype, "float16" or "float32"
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


# --- additions by the store helper: read-side containers returned by FeatureStore ---


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
    """Rows of one feature as read for training: values are float32 and padded to max_steps."""

    rows: np.ndarray  # (n,) int64 store rows, in the order requested
    values: np.ndarray  # (n, T, [K,] D) float32
    mask: np.ndarray  # (n, T) bool; False on every step of a row that is not OK
    time: np.ndarray  # (n, T) float32 seconds, NaN where no step
    status: np.ndarray  # (n,) uint8 Status codes
    available: np.ndarray  # (n,) bool = status == OK
    slot_mask: np.ndarray | None = None  # (n, T, K) bool for slot features, False where not OK
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n, T, [K,] *shape)
