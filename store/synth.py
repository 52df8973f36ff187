"""Synthetic tvr stores with planted, learnable text-video structure (`tvr-store synth`).

The store is written through the same `FeatureStore` code path as extraction (create, ensure_feature, write,
write_block, pack_ready), with provenance `{"weights": {"synthetic": true, "random": true, "seed": S}, "preset":
"synthetic", "small": ...}` ("random": true is the weights identity ensure_feature accepts for model-less data).

Planted structure: every item has a latent concept vector z (items come in clusters, so near-duplicates make
retrieval non-trivial). Each modality sees z through its own random projection, a subset of the latent
dimensions and its own noise level, so modalities differ in how informative they are (clip > resnet152 ~
dlib_face > i3d_flow > vggish). Captions see a noisy copy of z: "glove" holds word-vector sequences (content
words express random subsets of z, mixed with stop words), "clip_text" a CLIP-like text vector sharing the
"clip" projection only in part (TEXT_SHARED), so zero-shot cosine retrieval is informative but weak, as with real
frozen CLIP features, and T-MASS/X-Pool must learn the rest (on the 300-item test store: untrained X-Pool t2v R@1
~25% of 30 test videos, trained ~55%).

Multiple choice (LSMDC-style), written when `choices > 0` with `FeatureStore.set_choices` (store/_choices.py):
one question per test-split video, its options one true caption of the clip and captions of other items of the
same split, in random order. `train.data.StoreData.choice_set` reads it (`FeatureStore.choices`).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from store.schema import CaptionRecord, ExtraSpec, FeatureRows, FeatureSpec, ItemRecord, Status

if TYPE_CHECKING:
    from store.zarr_store import FeatureStore

LATENT = 24  # latent concept dims
N_CLUSTERS_FRACTION = 0.1  # clusters per item: items share a concept centre with ~10 others
CAPTION_NOISE = 1.0  # caption latent = z + this * noise
TEXT_SHARED = 0.3  # share of the clip_text projection that equals the clip frame projection (zero-shot strength)
CAPTION_CHUNK = 256  # caption-axis chunk rows
PACK_EVERY_ROWS = 4096  # pack finished shards this often while writing

# modality -> (feature name, ABSENT reason) for --missing keys given as modality names
MISSING_KEYS = {
    "face": ("dlib_face", "no_face"),
    "audio": ("vggish", "no_audio"),
    "motion": ("i3d_flow", "no_motion"),
    "appearance": ("resnet152", "missing"),
    "clip": ("clip", "missing"),
}


@dataclass(frozen=True)
class _Modality:
    """How one item feature is generated from the latent concept."""

    spec: FeatureSpec
    fraction: float  # share of latent dims this modality sees
    noise: float  # per-step noise std in latent space
    offset_ratio: float  # shared offset norm / typical signal norm (real features are far from zero-mean)
    relu: bool = False  # non-negative like pooled CNN activations
    steps_per_s: float = 1.0  # valid steps per second of video, capped at max_steps


def feature_specs(small: bool = False) -> dict[str, FeatureSpec]:
    """Specs of every synthetic feature: real names and dims, or 64-d ones when `small`."""
    d = (lambda real: 64) if small else (lambda real: real)
    t = 8 if small else 32
    return {
        "resnet152": FeatureSpec("resnet152", d(2048), t, modality="appearance"),
        "i3d_flow": FeatureSpec("i3d_flow", d(1024), t // 2 if small else 16, modality="motion"),
        "vggish": FeatureSpec("vggish", d(128), t, modality="audio"),
        "dlib_face": FeatureSpec(
            "dlib_face", d(128), 8 if small else 16, modality="face", slots=4, extras=(ExtraSpec("box", (4,)),)
        ),
        "clip": FeatureSpec("clip", d(512), 12, dtype="float32", modality="clip"),
        "clip_text": FeatureSpec(
            "clip_text", d(512), 1, dtype="float32", modality="text", axis="caption", chunk_rows=CAPTION_CHUNK
        ),
        "glove": FeatureSpec(
            "glove", 50, 30, dtype="float32", modality="words", axis="caption", chunk_rows=CAPTION_CHUNK
        ),
    }


def _modalities(specs: Mapping[str, FeatureSpec]) -> dict[str, _Modality]:
    return {
        "resnet152": _Modality(specs["resnet152"], 0.75, 0.9, 0.8, relu=True, steps_per_s=1.0),
        "i3d_flow": _Modality(specs["i3d_flow"], 0.5, 1.1, 0.5, steps_per_s=0.64),
        "vggish": _Modality(specs["vggish"], 0.4, 1.3, 0.7, steps_per_s=1.04),
        "dlib_face": _Modality(specs["dlib_face"], 0.5, 0.35, 0.3, steps_per_s=1.0),
        "clip": _Modality(specs["clip"], 1.0, 0.8, 1.0, steps_per_s=0.0),
    }


def parse_missing(text: str) -> dict[str, float]:
    """Parse "face=0.5,audio=0.2" (modality or feature names) into {feature: rate}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        names = {k: v[0] for k, v in MISSING_KEYS.items()} | {v[0]: v[0] for v in MISSING_KEYS.values()}
        if not sep or key not in names:
            raise ValueError(
                f"--missing: bad entry {part!r}; use KEY=RATE with KEY one of {sorted(names)}, e.g. face=0.5,audio=0.2"
            )
        rate = float(value)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--missing: rate for {key!r} must be in [0, 1], got {rate}")
        out[names[key]] = rate
    return out


def parse_splits(text: str) -> tuple[float, float, float] | None:
    """Parse "0.8,0.1,0.1" into train/val/test fractions; "none" -> no splits (all "")."""
    if text.strip().lower() in ("none", ""):
        return None
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3 or min(parts) < 0 or not math.isclose(sum(parts), 1.0, abs_tol=1e-6):
        raise ValueError(f"--splits: need three non-negative fractions summing to 1 (train,val,test), got {text!r}")
    return parts[0], parts[1], parts[2]


def _reason(feature: str) -> str:
    return next((r for f, r in MISSING_KEYS.values() if f == feature), "missing")


def _projection(rng: np.random.Generator, fraction: float, dim: int) -> np.ndarray:
    """(LATENT, dim) projection that only reads a random `fraction` of the latent dims."""
    keep = np.zeros(LATENT, dtype=bool)
    keep[rng.choice(LATENT, max(1, round(fraction * LATENT)), replace=False)] = True
    proj = rng.standard_normal((LATENT, dim)) / math.sqrt(LATENT)
    proj[~keep] = 0.0
    return proj


def _step_times(n: int, duration: float) -> np.ndarray:
    if duration <= 0:
        return np.zeros(n, dtype=np.float32)
    return (np.arange(n) * duration / n).astype(np.float32)


def _item_rows(
    rng: np.random.Generator,
    name: str,
    mod: _Modality,
    proj: np.ndarray,
    offset: np.ndarray,
    z: np.ndarray,
    kind: str,
    duration: float,
) -> FeatureRows:
    """One OK row of an item feature: noisy projections of the item's latent concept per step."""
    spec = mod.spec
    if kind == "image":
        n = 1
    elif name == "clip":
        n = spec.max_steps
    else:
        n = int(min(spec.max_steps, max(1, math.floor(duration * mod.steps_per_s))))
    lat = z[None, :] + mod.noise * rng.standard_normal((n, LATENT))
    if spec.slots:
        k = spec.slots
        # a few identities per video (all tied to its concept), 0..K faces per step, >= 1 face somewhere
        ids = z[None, :] + 0.3 * rng.standard_normal((k, LATENT))
        counts = rng.integers(0, k + 1, size=n)
        counts[rng.integers(n)] = max(1, counts.max())
        slot_mask = np.arange(k)[None, :] < counts[:, None]
        lat = ids[None, :, :] + mod.noise * rng.standard_normal((n, k, LATENT))
        vals = lat @ proj + offset
        vals[~slot_mask] = 0.0
        boxes = rng.uniform(0, 200, size=(n, k, 4)).astype(np.float32)
        boxes[~slot_mask] = 0.0
        return FeatureRows(
            Status.OK, vals.astype(np.float32), _step_times(n, duration), slot_mask=slot_mask, extras={"box": boxes}
        )
    vals = lat @ proj + offset
    if mod.relu:
        vals = np.maximum(vals, 0.0)
    return FeatureRows(Status.OK, vals.astype(np.float32), _step_times(n, duration))


def generate(
    url: str | Path,
    *,
    items: int,
    captions_per_item: int = 10,
    missing: Mapping[str, float] | None = None,
    images: int = 0,
    seed: int = 0,
    splits: Sequence[float] | None = (0.8, 0.1, 0.1),
    small: bool = False,
    choices: int = 0,
    overwrite: bool = False,
    progress: bool = False,
):
    """Write a synthetic store at `url` and return it opened read-only (FeatureStore)."""
    from store.zarr_store import FeatureStore  # lazy: keeps `import store.synth` cheap for the CLI

    if items < 1 or captions_per_item < 1 or images < 0:
        raise ValueError("synth: need items >= 1, captions_per_item >= 1 and images >= 0")
    if choices == 1 or choices < 0:
        raise ValueError("synth: --choices must be 0 (none) or >= 2 options per question")
    missing = dict(missing or {})
    rng = np.random.default_rng(seed)
    specs = feature_specs(small)
    mods = _modalities(specs)

    # concepts: cluster centres + per-item deviation
    n_all = items + images
    n_clusters = max(2, int(round(n_all * N_CLUSTERS_FRACTION)))
    centres = rng.standard_normal((n_clusters, LATENT))
    z = 0.8 * centres[rng.integers(n_clusters, size=n_all)] + 0.75 * rng.standard_normal((n_all, LATENT))
    records, caps = _records(rng, items, images, splits, captions_per_item)
    store = FeatureStore.create(str(url), records, caps, overwrite=overwrite)
    # "random": True is what FeatureStore.ensure_feature accepts for weight-less features; "synthetic" marks the source
    provenance = {
        "weights": {"synthetic": True, "random": True, "seed": int(seed)}, "preset": "synthetic", "small": bool(small)
    }
    for spec in specs.values():
        store.ensure_feature(spec, provenance)

    projs = {name: _projection(rng, mod.fraction, mod.spec.dim) for name, mod in mods.items()}
    offsets, signal = {}, {}
    for name, mod in mods.items():
        signal[name] = float(np.linalg.norm(z[:256] @ projs[name], axis=1).mean())
        off = rng.standard_normal(mod.spec.dim)
        offsets[name] = off / np.linalg.norm(off) * mod.offset_ratio * signal[name]
    # CLIP-like scale: frame vectors of norm ~10
    clip_scale = 10.0 / math.sqrt(signal["clip"] ** 2 * (1.0 + mods["clip"].noise**2) + np.sum(offsets["clip"] ** 2))

    rows_iter: Iterable[int] = range(n_all)
    if progress:
        from tqdm import tqdm

        rows_iter = tqdm(rows_iter, desc="synth items", unit="item")
    for row in rows_iter:
        _write_item(store, rng, mods, records[row], row, missing, projs, offsets, z[row], clip_scale)
        if row % PACK_EVERY_ROWS == PACK_EVERY_ROWS - 1:
            store.pack_ready()  # keeps the staging area to the shards in progress

    _write_captions(store, rng, specs, projs["clip"], offsets["clip"] * 0.6, clip_scale, z, captions_per_item)
    store.pack_ready(partial=True)
    if choices:
        _write_choices(store, rng, records, caps, captions_per_item, choices)
    return FeatureStore.open(str(url))


def _records(rng: np.random.Generator, items: int, images: int, splits: Sequence[float] | None,
             captions_per_item: int) -> tuple[list[ItemRecord], list[CaptionRecord]]:
    """Item records (random splits and durations; images train only) and their synthetic captions."""
    split_of = np.full(items + images, "", dtype=object)
    if splits is not None:
        order = rng.permutation(items)
        n_train = int(round(splits[0] * items))
        n_val = int(round(splits[1] * items))
        split_of[order[:n_train]] = "train"
        split_of[order[n_train : n_train + n_val]] = "val"
        split_of[order[n_train + n_val :]] = "test"
        split_of[items:] = "train"  # images only augment training, as COCO does for MEE
    durations = rng.uniform(4.0, 30.0, size=items)
    records = [
        ItemRecord(f"video{i:05d}", f"synthetic://video{i:05d}.mp4", "video", float(durations[i]), split_of[i])
        for i in range(items)
    ] + [ItemRecord(f"image{j:05d}", f"synthetic://image{j:05d}.jpg", "image", 0.0, split_of[items + j])
         for j in range(images)]
    caps = [
        CaptionRecord(f"{rec.id}#{c}", rec.id, f"synthetic caption {c} of {rec.id}")
        for rec in records
        for c in range(captions_per_item)
    ]
    return records, caps


def _write_item(store: FeatureStore, rng: np.random.Generator, mods: Mapping[str, _Modality], rec: ItemRecord,
                row: int, missing: Mapping[str, float], projs: Mapping[str, np.ndarray],
                offsets: Mapping[str, np.ndarray], z: np.ndarray, clip_scale: float) -> None:
    """Write every modality's row of one item (images have no motion and no audio; some rows go missing)."""
    for name, mod in mods.items():
        if rec.kind == "image" and name in ("i3d_flow", "vggish"):
            reason = "no_motion" if name == "i3d_flow" else "no_audio"
            store.write(name, row, FeatureRows.absent(mod.spec, reason, f"{rec.id} is an image"))
            continue
        if rng.random() < missing.get(name, 0.0):
            store.write(name, row, FeatureRows.absent(mod.spec, _reason(name), "synthetic missing modality"))
            continue
        result = _item_rows(rng, name, mod, projs[name], offsets[name], z, rec.kind, rec.duration)
        if name == "clip":
            result.values *= clip_scale
            result.values = result.values.astype(np.float32)
        store.write(name, row, result)


def _write_captions(
    store,
    rng: np.random.Generator,
    specs: Mapping[str, FeatureSpec],
    clip_proj: np.ndarray,
    text_offset: np.ndarray,
    clip_scale: float,
    z: np.ndarray,
    per_item: int,
) -> None:
    """Write "glove" word sequences and "clip_text" vectors for every caption, block by block."""
    g, ct = specs["glove"], specs["clip_text"]
    word_proj = rng.standard_normal((LATENT, g.dim)) / math.sqrt(LATENT)
    stop_words = rng.standard_normal((20, g.dim)) * 0.6
    # modality gap: text shares only part of the frame projection, so zero-shot cosine is informative but weak
    text_proj = TEXT_SHARED * clip_proj + math.sqrt(1 - TEXT_SHARED**2) * _projection(rng, 1.0, ct.dim)
    n_caps = z.shape[0] * per_item
    glove_rows: list[FeatureRows] = []
    text_rows: list[FeatureRows] = []
    for c in range(n_caps):
        zc = z[c // per_item] + CAPTION_NOISE * rng.standard_normal(LATENT)
        n_tok = int(rng.integers(5, g.max_steps + 1))
        gates = rng.random((n_tok, LATENT)) < 0.35
        toks = (gates * zc[None, :]) @ word_proj + 0.3 * rng.standard_normal((n_tok, g.dim))
        stop = rng.random(n_tok) < 0.35
        toks[stop] = stop_words[rng.integers(len(stop_words), size=int(stop.sum()))]
        glove_rows.append(FeatureRows(Status.OK, toks.astype(np.float32), np.zeros(n_tok, dtype=np.float32)))
        tv = (zc + 0.3 * rng.standard_normal(LATENT)) @ text_proj + text_offset
        tv = tv * clip_scale + 0.3 * rng.standard_normal(ct.dim)
        text_rows.append(FeatureRows(Status.OK, tv[None, :].astype(np.float32), np.zeros(1, dtype=np.float32)))
    for start in range(0, n_caps, CAPTION_CHUNK):
        store.write_block("glove", start, glove_rows[start : start + CAPTION_CHUNK])
        store.write_block("clip_text", start, text_rows[start : start + CAPTION_CHUNK])


def _write_choices(
    store: FeatureStore, rng: np.random.Generator, records: Sequence[ItemRecord], caps: Sequence[CaptionRecord],
    per_item: int, n_opt: int
) -> None:
    """The store's multiple-choice set: one question per test video (see the module docstring)."""
    split_of = np.array([r.split for r in records if r.kind == "video"])
    pool = np.flatnonzero(split_of == "test")
    if len(pool) < n_opt:
        pool = np.arange(len(split_of))
    q_items, q_caps, q_ans = [], [], []
    for item in pool:
        others = rng.choice(pool[pool != item], n_opt - 1, replace=False)
        options = [int(item)] + [int(o) for o in others]
        rows = [o * per_item + int(rng.integers(per_item)) for o in options]
        perm = rng.permutation(n_opt)
        q_items.append(records[int(item)].id)
        q_caps.append([caps[rows[p]].id for p in perm])
        q_ans.append(int(np.flatnonzero(perm == 0)[0]))
    store.set_choices(q_items, q_caps, q_ans)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tvr-store synth`."""
    parser.add_argument("out", metavar="OUT", help="store path to create (a .zarr directory)")
    parser.add_argument("--items", type=int, required=True, help="number of videos")
    parser.add_argument("--captions-per-item", type=int, default=10, help="captions per video/image (default 10)")
    parser.add_argument(
        "--missing",
        default="face=0.5,audio=0.2",
        help="ABSENT rates per modality, e.g. face=0.5,audio=0.2 (keys: face, audio, motion, appearance, clip "
        "or feature names; default face=0.5,audio=0.2; '' for none)",
    )
    parser.add_argument("--images", type=int, default=0, help="COCO-like images (train split, no motion/audio)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> same store")
    parser.add_argument(
        "--splits", default="0.8,0.1,0.1", help="train,val,test fractions of the videos, or 'none' (all '')"
    )
    parser.add_argument("--small", action="store_true", help="64-d features and short step axes for fast tests")
    parser.add_argument(
        "--choices", type=int, default=0, help="options per multiple-choice question for test videos (0 = none)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    """Run `tvr-store synth` from parsed arguments; returns the exit code."""
    import sys

    try:
        missing = parse_missing(args.missing)
        splits = parse_splits(args.splits)
    except ValueError as exc:
        print(f"tvr-store synth: {exc}", file=sys.stderr)
        return 2
    if Path(args.out).exists() and not args.overwrite:
        print(f"tvr-store synth: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    store = generate(
        args.out,
        items=args.items,
        captions_per_item=args.captions_per_item,
        missing=missing,
        images=args.images,
        seed=args.seed,
        splits=splits,
        small=args.small,
        choices=args.choices,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"wrote {args.out}: {store.n_items} items, {store.n_captions} captions, features {', '.join(store.features)}")
    return 0
