"""Every registered extractor, random weights: spec/weights fields, shapes, dtypes, masks, times, determinism, ABSENT.

Item extractors get a synthetic 1.2 s 64x48 clip (a moving pattern + a 440 Hz tone at 16 kHz) fed through
sessions exactly as the pipeline does; caption extractors get a few captions. When `extract.decode` exists the
same clip is also written losslessly with PyAV, decoded by extract.decode and run through `extract_path`. Every
extractor is also built with random_init="missing" in a place without weights: it must either find its real files
(packaged ones) or become exactly the random_init=True extractor, with a warning and the reason recorded.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import extract
from extract import (
    CaptionExtractor,
    Extractor,
    FrameStepExtractor,
    RandomWeightsWarning,
    WeightsError,
    create_extractor,
    list_extractors,
    register_extractor,
    transforms,
)
from extract._registry import _REGISTRY, UnknownExtractorError
from extract.decode import MediaInfo
from store.schema import FeatureRows, FeatureSpec, Status
from tests._extractors import IndexEcho
from tests._media import write_video

NAMES = list_extractors()
FPS, SECONDS, H, W, SR = 25, 1.2, 48, 64, 16000
# Options that keep the slow references small on 2 CPU cores (only for extractors that have them).
FAST: dict[str, dict[str, Any]] = {
    "i3d_rgb": {"stack_size": 9, "step_size": 32},
    "i3d_flow": {"stack_size": 9, "step_size": 32, "raft": "raft_small.C_T_V2", "num_flow_updates": 1},
}
CAPTIONS = ["A man is walking his dog in the park.", "", "qzxv wvvq", "the cat"]


def clip_frames(n: int = int(FPS * SECONDS)) -> np.ndarray:
    """Seeded smooth pattern moving 1 px down / 2 px right per frame, uint8 (n, H, W, 3)."""
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 256, (H // 4 + 2, W // 4 + 2, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    return np.stack([np.roll(base, (k, 2 * k), axis=(0, 1))[:H, :W] for k in range(n)])


def tone(seconds: float = SECONDS) -> np.ndarray:
    """440 Hz sine at 16 kHz, float32 mono."""
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)


_CACHE: dict[str, Extractor] = {}


def write_word2vec(path: Path) -> Path:
    """A tiny word2vec binary file (the real GoogleNews file is not available offline)."""
    words = ["a", "man", "is", "walking", "his", "dog", "in", "the", "park", "cat"]
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        f.write(f"{len(words)} 8\n".encode())
        for w in words:
            f.write(w.encode() + b" " + rng.standard_normal(8).astype("<f4").tobytes() + b"\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def _word2vec_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the word2vec extractor at a tiny file."""
    FAST["word2vec"] = {"weights_path": write_word2vec(tmp_path_factory.mktemp("w2v") / "tiny.bin")}


def get(name: str) -> Extractor:
    """One random-weights CPU instance per extractor for the whole module."""
    if name not in _CACHE:
        _CACHE[name] = create_extractor(name, random_init=True, device="cpu", **FAST.get(name, {}))
    return _CACHE[name]


def run(ex: Extractor, frames: np.ndarray, audio: np.ndarray | None, kind: str = "video") -> FeatureRows:
    """Stream frames (batches of 8) and audio (0.5 s chunks) through a session, as the pipeline does."""
    duration = 0.0 if kind == "image" else len(frames) / FPS
    info = MediaInfo("synthetic.mkv", kind, duration, True, audio is not None, width=W, height=H, fps=float(FPS))
    s = ex.start(info)
    if ex.needs_frames:
        for a in range(0, len(frames), 8):
            idx = np.arange(a, min(a + 8, len(frames)), dtype=np.int64)
            s.add_frames(SimpleNamespace(frames=frames[idx], times=idx / FPS, index=idx))  # type: ignore[arg-type]
    if ex.needs_audio and audio is not None:
        for a in range(0, len(audio), SR // 2):
            s.add_audio(audio[a : a + SR // 2])
    return s.finish()


def check_row(spec: FeatureSpec, r: FeatureRows) -> None:
    """The row agrees with the spec: shapes, dtypes, masks, times, extras."""
    assert r.status in (Status.OK, Status.ABSENT)
    n = r.values.shape[0]
    trailing = (spec.slots, spec.dim) if spec.slots else (spec.dim,)
    assert r.values.shape[1:] == trailing and n <= spec.max_steps
    assert r.times.shape == (n,)
    if r.status == Status.ABSENT:
        assert n == 0 and r.reason, "ABSENT rows are empty and say why"
        return
    assert n >= 1 and np.isfinite(r.values.astype(np.float32)).all()
    assert np.dtype(r.values.dtype) in (np.dtype(spec.dtype), np.dtype(np.float32))
    assert r.times.dtype == np.float32 and np.isfinite(r.times).all() and (np.diff(r.times) >= 0).all()
    if r.mask is not None:
        assert r.mask.shape == (n,) and r.mask.dtype == bool
    if spec.slots:
        assert r.slot_mask is None or (r.slot_mask.shape == (n, spec.slots) and r.slot_mask.dtype == bool)
    extras = {e.name: e for e in spec.extras}
    for k, v in r.extras.items():
        assert k in extras, f"extra {k!r} not declared in the spec"
        assert v.shape == (n, *((spec.slots,) if spec.slots else ()), *extras[k].shape)


def same(a: FeatureRows, b: FeatureRows) -> None:
    """Two runs gave identical rows."""
    assert a.status == b.status and a.reason == b.reason
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.times, b.times)
    for k in a.extras:
        np.testing.assert_array_equal(a.extras[k], b.extras[k])


@pytest.fixture(scope="module")
def media() -> tuple[np.ndarray, np.ndarray]:
    """The synthetic clip's frames and audio."""
    return clip_frames(), tone()


@pytest.mark.parametrize("name", NAMES)
def test_spec_and_weights_fields(name: str) -> None:
    ex = get(name)
    spec = ex.spec
    assert isinstance(spec, FeatureSpec) and spec.name == name
    assert FeatureSpec.from_json(spec.to_json()) == spec
    assert spec.axis == ("caption" if isinstance(ex, CaptionExtractor) else "item")
    assert spec.modality in ("appearance", "motion", "audio", "face", "clip", "text", "words", "frames")
    if not ex.has_weights:  # raw pixels (frames): no model, one fixed identity, random or not
        assert ex.provenance()["weights"] == {"file": "none (raw pixels, no model)", "sha256": ""}
        assert ex.provenance()["preset"] in transforms.PRESETS
        return
    w = ex.weights
    assert w is not None, "every extractor declares its weights spec"
    assert w.filename and "/" not in w.filename and w.url and w.name
    assert re.fullmatch(r"[0-9a-f]*", w.sha256) and (len(w.sha256) in (0, 64) or len(w.sha256) >= 6), w.sha256
    assert w.preset in transforms.PRESETS, f"preset {w.preset!r} not registered in extract.transforms"
    prov = ex.provenance()
    assert prov["tvr_version"] and "weights" in prov and "preset" in prov and prov["preset"] in transforms.PRESETS
    wid = prov["weights"]
    assert wid == {"random": True, "seed": 0} or (wid.get("file") and re.fullmatch(r"[0-9a-f]{64}", wid["sha256"]))


@pytest.mark.parametrize("name", NAMES)
def test_video_rows_shapes_and_determinism(name: str, media: tuple[np.ndarray, np.ndarray]) -> None:
    ex = get(name)
    if isinstance(ex, CaptionExtractor):
        rows = ex.encode_captions(CAPTIONS)
        assert len(rows) == len(CAPTIONS)
        for r in rows:
            check_row(ex.spec, r)
        assert rows[0].status == Status.OK and rows[1].status == Status.ABSENT
        for a, b in zip(rows, ex.encode_captions(CAPTIONS)):
            same(a, b)
        return
    frames, audio = media
    a = run(ex, frames, audio)
    check_row(ex.spec, a)
    if ex.spec.modality == "face":  # the synthetic pattern has no face: the whole item is ABSENT no_face
        assert (a.status, a.reason) == (Status.ABSENT, "no_face"), a.message
    else:
        assert a.status == Status.OK, f"{name}: {a.reason} {a.message}"
        assert float(a.times.max()) < SECONDS
        if ex.spec.slots == 0 and a.mask is not None:
            assert a.mask.all(), "frame/stack/example steps are all real ones"
    same(a, run(ex, frames, audio))
    if ex.needs_audio:  # the same video without an audio stream
        silent = run(ex, frames, None)
        check_row(ex.spec, silent)
        assert (silent.status, silent.reason) == (Status.ABSENT, "no_audio")
        short = run(ex, frames, audio[: 15599])  # one sample short of VGGish's first 0.975 s example
        assert (short.status, short.reason) == (Status.ABSENT, "too_short")


# What a still image gives: no motion, no audio, no stack of frames, and the synthetic pattern has no face.
IMAGE_ABSENT = {"motion": "no_motion", "audio": "no_audio", "face": "no_face"}


@pytest.mark.parametrize("name", NAMES)
def test_image_rows(name: str, media: tuple[np.ndarray, np.ndarray]) -> None:
    ex = get(name)
    if isinstance(ex, CaptionExtractor):
        pytest.skip("caption feature")
    r = run(ex, media[0][:1], None, kind="image")
    check_row(ex.spec, r)
    if isinstance(ex, FrameStepExtractor):  # frame-level features: one step at t=0
        assert r.status == Status.OK and r.values.shape[0] == 1
        np.testing.assert_array_equal(r.times, [0.0])
    else:
        want = IMAGE_ABSENT.get(ex.spec.modality, "too_short")  # i3d_rgb: one frame is no 10-frame stack
        assert (r.status, r.reason) == (Status.ABSENT, want), r.message


@pytest.mark.parametrize("name", NAMES)
def test_extract_path_matches_sessions(name: str, media: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    ex = get(name)
    if isinstance(ex, CaptionExtractor):
        pytest.skip("caption feature")
    path = tmp_path / "clip.mkv"
    frames, audio = media
    write_video(path, frames, fps=FPS, audio=audio, sample_rate=SR)  # lossless video + 16 kHz mono PCM
    r = ex.extract_path(path)
    check_row(ex.spec, r)
    if ex.spec.modality in ("appearance", "clip", "motion"):  # lossless video: same frames, same values
        ref = run(ex, *media)
        assert r.status == ref.status
        np.testing.assert_allclose(r.times, ref.times)
        np.testing.assert_allclose(r.values.astype(np.float32), ref.values.astype(np.float32), rtol=1e-4, atol=1e-4)


def test_registry_lists_the_other_helpers_modules_when_present() -> None:
    import importlib.util

    for mod, names in (("i3d", {"i3d_rgb", "i3d_flow"}), ("vggish", {"vggish"}), ("dlib_face", {"dlib_face"})):
        if importlib.util.find_spec(f"extract.{mod}") is not None:
            assert names <= set(NAMES), mod
    assert extract.list_extractors is list_extractors


def test_registry_duplicate_unknown_and_options() -> None:
    assert {"resnet152", "clip", "clip_text", "glove", "word2vec"} <= set(list_extractors())
    assert list_extractors() == sorted(list_extractors())
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("resnet152")(IndexEcho)
    with pytest.raises(UnknownExtractorError, match="no extractor named 'nope'.*resnet152"):
        create_extractor("nope")
    try:
        register_extractor("index_echo_tmp")(IndexEcho)
        ex = create_extractor("index_echo_tmp", random_init=True, seed=3)
        assert isinstance(ex, IndexEcho)
        with pytest.raises(TypeError, match="unknown options"):
            create_extractor("index_echo_tmp", random_init=True, bogus=1)
    finally:
        _REGISTRY.pop("index_echo_tmp", None)


@pytest.fixture
def no_weights_anywhere(no_weights_anywhere: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """conftest.py's no_weights_anywhere, and an empty Hugging Face cache."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    return no_weights_anywhere


PACKAGED = {"glove", "dlib_face"}  # real files ship in installed packages: found even with no weights dir


@pytest.mark.parametrize("name", NAMES)
def test_random_if_missing(name: str, media: tuple[np.ndarray, np.ndarray], no_weights_anywhere: Path) -> None:
    opts = FAST.get(name, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = create_extractor(name, random_init="missing", device="cpu", **opts)
    fell_back = [w for w in caught if issubclass(w.category, RandomWeightsWarning)]
    wid = ex.provenance()["weights"]
    if not ex.has_weights:  # raw pixels: nothing to find, nothing to fall back from
        assert not fell_back and "random" not in wid, wid
        return
    if name in PACKAGED or "weights_path" in opts:
        assert not fell_back and wid.get("file") and "random" not in wid, wid
        return
    assert len(fell_back) == 1 and "USING SEEDED RANDOM WEIGHTS" in str(fell_back[0].message)
    assert wid == {**get(name).provenance()["weights"], "reason": ex.random_reason}
    assert wid["random"] is True and wid["seed"] == 0 and wid["reason"].startswith("weights not found: ")
    assert ex.spec == get(name).spec
    if isinstance(ex, CaptionExtractor):  # exactly the random_init=True weights
        for a, b in zip(ex.encode_captions(CAPTIONS), get(name).encode_captions(CAPTIONS)):
            same(a, b)
    else:
        same(run(ex, *media), run(get(name), *media))


def test_random_if_missing_cannot_invent_word_vectors(no_weights_anywhere: Path) -> None:
    with pytest.raises(WeightsError, match="GoogleNews-vectors-negative300.bin.*cannot run with random weights"):
        create_extractor("word2vec", random_init="missing")


@pytest.mark.parametrize("name", NAMES)
def test_builders_take_keyword_arguments_only(name: str) -> None:
    import inspect

    cls = extract.extractor_class(name)
    assert isinstance(cls, type) and issubclass(cls, Extractor)
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or not issubclass(klass, Extractor):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]  # drop self
        bad = [p.name for p in params if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
        assert not bad, f"{klass.__name__}.__init__ takes {bad} positionally"
    with pytest.raises(TypeError):
        cls("positional")  # refused before anything is built


def _declared_weights_specs() -> list[tuple[str, Any]]:
    """Every WeightsSpec an extractor module declares at module level (alone, or in dicts/tuples)."""
    import importlib

    from extract import WeightsSpec
    from extract.clip_frames import DEFAULT_MODEL, DEFAULT_PRETRAINED, clip_weights_spec

    found: dict[int, tuple[str, Any]] = {}
    for mod in ("resnet152", "i3d", "raft_flow", "vggish", "_dlib_models", "word_vectors"):
        for attr, value in vars(importlib.import_module(f"extract.{mod}")).items():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
            for v in values:
                if isinstance(v, WeightsSpec):
                    found.setdefault(id(v), (f"{mod}.{attr}:{v.name}", v))
    found[0] = ("clip_frames default", clip_weights_spec(DEFAULT_MODEL, DEFAULT_PRETRAINED))
    return sorted(found.values(), key=lambda kv: kv[0])


def test_every_declared_weights_spec_is_well_formed() -> None:
    from extract._weights import HASH_IN_NAME

    specs = _declared_weights_specs()
    assert len(specs) >= 20  # 2 ResNet + 6 I3D + 8 RAFT + 2 VGGish + 4 dlib + 2 word vectors + CLIP
    names = [s.name for _, s in specs]
    assert len(names) == len(set(names)), "weights variant names are unique"
    for where, s in specs:
        assert s.name and s.filename and "/" not in s.filename, where
        assert s.url.startswith(("http://", "https://")), where
        assert s.preset in transforms.PRESETS, where
        assert re.fullmatch(r"[0-9a-f]*", s.sha256) and (s.sha256 == "" or 6 <= len(s.sha256) <= 64), where
        m = HASH_IN_NAME.search(s.filename)
        if m and s.sha256:  # a torch.hub-style name: the pinned digest agrees with the name's prefix
            assert s.sha256.startswith(m.group(1)) or m.group(1).startswith(s.sha256), where


_DIGEST = '''
import hashlib
import torch


def weights_digest(ex):
    """sha256 over every torch module an extractor holds (ex.model, ex.net, ex.flow.model, ...)."""
    h = hashlib.sha256()
    mods = []
    for key in sorted(vars(ex)):
        v = vars(ex)[key]
        if isinstance(v, torch.nn.Module):
            mods.append((key, v))
        elif isinstance(getattr(v, "model", None), torch.nn.Module):
            mods.append((key + ".model", v.model))
    assert mods, type(ex)
    for key, m in mods:
        for k, t in sorted(m.state_dict().items()):
            h.update(f"{key}.{k}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
'''


def _has_weights(name: str) -> bool:
    """Whether the extractor registered as `name` holds a model (factories are assumed to)."""
    cls = extract.extractor_class(name)
    return not isinstance(cls, type) or cls.has_weights


RANDOM_CAPABLE = [n for n in NAMES if n not in PACKAGED and n != "word2vec" and _has_weights(n)]  # torch models


@pytest.mark.slow
def test_random_weights_are_identical_in_another_worker_process() -> None:
    """A fresh process (as a Ray worker is), with a different global RNG state, builds byte-identical weights."""
    import json
    import subprocess
    import sys

    ns: dict[str, Any] = {}
    exec(_DIGEST, ns)  # noqa: S102 - the same digest code runs in both processes
    here = {n: ns["weights_digest"](get(n)) for n in RANDOM_CAPABLE}
    code = _DIGEST + (
        "import json, sys, numpy as np\n"
        "torch.manual_seed(12345); np.random.seed(54321)  # a worker's RNG state is whatever it is\n"
        "from extract import create_extractor\n"
        f"names, fast = {RANDOM_CAPABLE!r}, {({k: v for k, v in FAST.items() if k != 'word2vec'})!r}\n"
        "print(json.dumps({n: weights_digest(create_extractor(n, random_init=True, device='cpu', "
        "**fast.get(n, {}))) for n in names}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(there) == set(here) >= {"resnet152", "clip", "i3d_flow", "vggish"}
    assert there == here
