"""Small stand-ins shared by test modules: a tiny feature store and fake weights files with their sha256.

conftest.py wraps them as the `tiny_store` and `fake_weights` fixtures; modules that need a store or weights at
import or module scope call the functions directly.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from store import CaptionRecord, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status

if TYPE_CHECKING:  # imported where used: store-only test modules stay free of torch and the extractors
    import torch

    from extract import WeightsSpec

RANDOM_PROVENANCE: Mapping[str, object] = {"weights": {"random": True, "seed": 0}, "preset": "test"}
FAKE_URL = "https://example.org/"  # provenance only: tests never download


# ---- tiny store ----------------------------------------------------------------------------------------------
def tiny_items(n: int, splits: Sequence[str] = ("train", "val", "test")) -> list[ItemRecord]:
    """Items v0..v{n-1}: 2 s videos at /data/v{i}.mp4, splits cycling through `splits`."""
    return [ItemRecord(f"v{i}", f"/data/v{i}.mp4", duration=2.0, split=splits[i % len(splits)]) for i in range(n)]


def tiny_captions(items: Sequence[ItemRecord], per_item: int = 1) -> list[CaptionRecord]:
    """`per_item` captions per item, ids `<item>#<k>` (the pipeline's caption ids)."""
    return [CaptionRecord(f"{it.id}#{k}", it.id, f"caption {k} of {it.id}") for it in items for k in range(per_item)]


def tiny_row(spec: FeatureSpec, row: int, rng: np.random.Generator, absent_every: int = 0) -> FeatureRows:
    """Row `row` of `spec`: ABSENT every `absent_every`-th row (0: never), else OK with 1 + row % max_steps steps."""
    if absent_every and row % absent_every == absent_every - 1:
        return FeatureRows.absent(spec, "no_audio" if spec.modality == "audio" else "none")
    k = 1 + row % spec.max_steps
    lead = (k, spec.slots) if spec.slots else (k,)
    extras = {e.name: rng.standard_normal((*lead, *e.shape)).astype(e.dtype) for e in spec.extras}
    return FeatureRows(Status.OK, rng.standard_normal((*lead, spec.dim)), np.arange(k, dtype=np.float32) * 0.5,
                       extras=extras)


def tiny_store(path: Path, n: int = 4, *, features: Sequence[FeatureSpec] = (), captions: int = 1,
               fill: bool = True, absent_every: int = 0, splits: Sequence[str] = ("train", "val", "test"),
               shard_rows: int | None = None, seed: int = 0) -> FeatureStore:
    """A store of `n` tiny_items with `captions` captions each and `features` (random provenance).

    `fill`: every row of every feature gets seeded tiny_row content and the store is packed and reopened
    read-only; otherwise the features are created empty (all PENDING) and the writable store is returned.
    """
    items = tiny_items(n, splits)
    store = FeatureStore.create(path, items, tiny_captions(items, captions),
                                features=[(s, RANDOM_PROVENANCE) for s in features], shard_rows=shard_rows)
    if not fill:
        return store
    rng = np.random.default_rng(seed)
    for spec in features:
        rows = store.n_rows(spec.name)
        store.write_block(spec.name, 0, [tiny_row(spec, r, rng, absent_every) for r in range(rows)])
    store.pack_ready(partial=True)
    return FeatureStore.open(store.url)


class TinyStoreFactory(Protocol):
    """The `tiny_store` fixture: a store under the test's tmp_path (see tiny_store)."""

    def __call__(self, n: int = 4, *, features: Sequence[FeatureSpec] = (), captions: int = 1, fill: bool = True,
                 absent_every: int = 0, splits: Sequence[str] = ("train", "val", "test"),
                 shard_rows: int | None = None, seed: int = 0, name: str = "tiny.zarr") -> FeatureStore: ...


# ---- fake weights --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeWeights:
    """A weights file written for a test, its bytes and digest, and a WeightsSpec that pins exactly it."""

    path: Path
    data: bytes
    sha256: str
    spec: WeightsSpec
    identity: dict[str, str] = field(default_factory=dict)  # what provenance()["weights"] records for it


def weights_bytes(content: bytes | Mapping[str, torch.Tensor] | torch.nn.Module) -> bytes:
    """Raw bytes as given, or the torch.save bytes of a state dict (a module's, for a module)."""
    import torch

    if isinstance(content, bytes):
        return content
    state = content.state_dict() if isinstance(content, torch.nn.Module) else dict(content)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def fake_weights(directory: Path, content: bytes | Mapping[str, torch.Tensor] | torch.nn.Module = b"fake weights",
                 filename: str = "net.pth", *, name: str = "V1", preset: str = "imagenet_v1",
                 meta: Mapping[str, object] | None = None) -> FakeWeights:
    """Write `content` (bytes, a state dict or a module's state dict) as directory/filename, pinned by sha256."""
    from extract import WeightsSpec

    data = weights_bytes(content)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    spec = WeightsSpec(name, filename, digest, FAKE_URL + filename, preset, meta=dict(meta or {}))
    return FakeWeights(path, data, digest, spec, {"file": filename, "sha256": digest})


class FakeWeightsFactory(Protocol):
    """The `fake_weights` fixture: fake_weights under the test's tmp_path unless `directory` is given."""

    def __call__(self, content: bytes | Mapping[str, torch.Tensor] | torch.nn.Module = b"fake weights",
                 filename: str = "net.pth", *, name: str = "V1", preset: str = "imagenet_v1",
                 meta: Mapping[str, object] | None = None, directory: Path | None = None) -> FakeWeights: ...
