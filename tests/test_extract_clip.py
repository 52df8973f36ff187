"""CLIP frames + text (open_clip): open_clip's own preprocessing, unnormalised float32, one shared model."""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from extract import WeightsError, create_extractor
from extract import WeightsSpec
from extract.clip_frames import ClipFrames, clip_weights_spec, is_torchscript, load_clip_checkpoint
from extract.clip_text import ClipText
from store.schema import Status


@pytest.fixture(scope="module")
def pair() -> tuple[ClipFrames, ClipText]:
    """Random-weights frame and text extractors (sharing one model)."""
    c = create_extractor("clip", random_init=True, device="cpu", count=4)
    t = create_extractor("clip_text", random_init=True, device="cpu")
    return c, t  # type: ignore[return-value]


def frames(n: int, h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    """Seeded uint8 RGB frames."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_specs_and_shared_weights(pair: tuple[ClipFrames, ClipText]) -> None:
    c, t = pair
    assert c.spec.name == "clip" and c.spec.dim == 512 and c.spec.dtype == "float32" and c.spec.max_steps == 4
    assert t.spec.name == "clip_text" and t.spec.axis == "caption" and t.spec.max_steps == 1 and t.spec.dim == 512
    assert t.model is c.model  # one model per process for the same weights options
    assert c.provenance()["weights"] == t.provenance()["weights"] == {"random": True, "seed": 0}
    assert create_extractor("clip", random_init=True).spec.max_steps == 12  # T-MASS default


def test_preprocessing_is_open_clip_own(pair: tuple[ClipFrames, ClipText]) -> None:
    c, _ = pair
    _, _, ref = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_quick_gelu=True)
    f = frames(2, 90, 130)
    got = c.preprocess(f)
    want = torch.stack([ref(Image.fromarray(x)) for x in f])
    assert got.shape == (2, 3, 224, 224) and torch.equal(got, want)


def test_image_features_unnormalised_and_exact(pair: tuple[ClipFrames, ClipText]) -> None:
    c, _ = pair
    f = frames(3)
    got = c.run_batch(f)
    with torch.no_grad():
        want = c.model.encode_image(c.preprocess(f)).numpy()
    assert got.dtype == np.float32 and got.shape == (3, 512)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_session_uniform_frames_and_determinism(pair: tuple[ClipFrames, ClipText]) -> None:
    c, _ = pair
    f = frames(50, seed=2)

    def once() -> np.ndarray:
        s = c.start(SimpleNamespace(kind="video", duration=2.0))
        for a in range(0, 50, 16):
            idx = np.arange(a, min(a + 16, 50))
            s.add_frames(SimpleNamespace(frames=f[idx], times=idx / 25, index=idx))
        r = s.finish()
        assert r.status == Status.OK and r.values.dtype == np.float32
        np.testing.assert_allclose(r.times, np.array([6, 18, 31, 43]) / 25, rtol=1e-6)  # middles of 4 segments
        return r.values

    a = once()
    np.testing.assert_array_equal(a, once())
    # batch of 4 vs batch of 1: float32 matmul blocking differs (openai/CLIP #114), ~1e-6 absolute
    np.testing.assert_allclose(a[2], c.run_batch(f[31:32])[0], rtol=1e-5, atol=1e-5)


def test_text_features_unnormalised_exact_and_deterministic(pair: tuple[ClipFrames, ClipText]) -> None:
    _, t = pair
    texts = ["a dog runs on the beach", "", "a cat sleeps"]
    rows = t.encode_captions(texts)
    assert [r.status for r in rows] == [Status.OK, Status.ABSENT, Status.OK] and rows[1].reason == "empty_text"
    tok = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        want = t.model.encode_text(tok([texts[0], texts[2]])).numpy()
    got = np.concatenate([rows[0].values, rows[2].values])
    assert got.dtype == np.float32 and rows[0].values.shape == (1, 512)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)
    again = t.encode_captions(texts)
    np.testing.assert_array_equal(again[0].values, rows[0].values)
    small = create_extractor("clip_text", random_init=True, batch_size=1)  # batching does not change values
    np.testing.assert_allclose(small.encode_captions(texts)[2].values, rows[2].values, rtol=1e-4, atol=1e-5)


def test_weights_specs() -> None:
    s = clip_weights_spec("ViT-B-32", "openai")
    assert s.filename == "ViT-B-32.pt" and len(s.sha256) == 64 and s.sha256 in s.url and s.preset == "open_clip"
    assert s.meta["hf_hub"] and s.meta["quick_gelu"] is True
    laion = clip_weights_spec("ViT-B-32", "laion2b_s34b_b79k")
    assert laion.filename == "ViT-B-32-laion2b_s34b_b79k.bin" and laion.sha256 == ""
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        clip_weights_spec("ViT-B-32", "no_such_tag")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        clip_weights_spec("ViT-Z-99", "openai")


def test_missing_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("TVR_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsError, match=r"ViT-B-32\.pt.*openaipublic.*40d36571"):
        create_extractor("clip", weights_dir=tmp_path)


@pytest.mark.slow
def test_local_checkpoint_file(pair: tuple[ClipFrames, ClipText], tmp_path: Path) -> None:
    """`pretrained=<file>` loads a state dict through open_clip and records file + sha256 (quick_gelu: the
    activation the weights were trained with; OpenAI's need QuickGELU, a file cannot say so)."""
    c, _ = pair
    path = tmp_path / "my_clip.pt"
    torch.save(c.model.state_dict(), path)
    ex = create_extractor("clip", pretrained=str(path), quick_gelu=True, device="cpu", count=4, seed=1)
    prov = ex.provenance()
    assert prov["weights"] == {"file": "my_clip.pt", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert prov["options"]["pretrained"] == "file" and prov["options"]["quick_gelu"] is True
    assert prov["variant"] == "ViT-B-32.file+quick_gelu"  # the activation is stated, not the weights' own fact
    f = frames(2)
    np.testing.assert_allclose(ex.run_batch(f), c.run_batch(f), rtol=1e-5, atol=1e-6)


class _HandQuickGELU(torch.nn.Module):
    """QuickGELU written out from its definition: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activations(model: torch.nn.Module) -> set[type]:
    """The activation module types in the transformers' MLPs."""
    return {type(m.gelu) for m in model.modules() if hasattr(m, "c_fc") and hasattr(m, "gelu")}


def _encode_with(model: torch.nn.Module, act: type, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Image and text embeddings with every MLP activation temporarily replaced by `act()`."""
    mlps = [m for m in model.modules() if hasattr(m, "c_fc") and hasattr(m, "gelu")]
    saved = [m.gelu for m in mlps]
    try:
        for m in mlps:
            m.gelu = act()
        with torch.inference_mode():
            return torch.cat([model.encode_image(x).flatten(), model.encode_text(tokens).flatten()])
    finally:
        for m, g in zip(mlps, saved):
            m.gelu = g


@pytest.mark.slow
def test_openai_weights_run_quick_gelu_equal_to_a_hand_built_reference(pair: tuple[ClipFrames, ClipText]) -> None:
    from open_clip.transformer import QuickGELU

    c, t = pair  # the default ViT-B-32 "openai" weights (random values)
    assert c.weights is not None and c.weights.meta["quick_gelu"] is True
    assert _activations(c.model) == {QuickGELU} and t.model is c.model
    x, tokens = c.prepare(frames(1)), t.tokenizer(["a dog on a skateboard"])
    with torch.inference_mode():
        built = torch.cat([c.model.encode_image(x).flatten(), c.model.encode_text(tokens).flatten()])
    torch.testing.assert_close(built, _encode_with(c.model, _HandQuickGELU, x, tokens), rtol=1e-5, atol=1e-5)
    gelu = _encode_with(c.model, torch.nn.GELU, x, tokens)  # what open_clip's plain ViT-B-32 config would run
    assert (gelu - built).abs().max() > 1e-3 * built.abs().max()
    for ex in (c, t):
        prov = ex.provenance()
        assert prov["options"]["quick_gelu"] is True and prov["variant"] == "ViT-B-32.openai"


@pytest.mark.slow
def test_non_openai_weights_keep_gelu() -> None:
    from open_clip.transformer import QuickGELU

    from extract import clip_frames

    before = set(clip_frames._CACHE)
    try:
        ex = create_extractor("clip", pretrained="laion2b_s34b_b79k", random_init=True, device="cpu", count=2)
        assert ex.weights.meta["quick_gelu"] is False
        assert _activations(ex.model) == {torch.nn.GELU} and QuickGELU not in _activations(ex.model)
        prov = ex.provenance()
        assert prov["options"]["quick_gelu"] is False and prov["variant"] == "ViT-B-32.laion2b_s34b_b79k"
    finally:
        for key in set(clip_frames._CACHE) - before:  # free the extra ViT-B-32
            clip_frames._CACHE.pop(key)


def test_a_file_is_identified_by_its_digest_and_gets_its_tags_activation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from open_clip.transformer import QuickGELU

    from extract import clip_frames

    name = "ViT-S-32-alt"  # a small stand-in for ViT-B-32 (its plain config builds nn.GELU too)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        src = open_clip.create_model(name, pretrained=None)
    assert _activations(src) == {torch.nn.GELU}
    path = tmp_path / "downloaded_clip.pt"
    torch.save(src.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    openai = WeightsSpec(f"{name}.openai", f"{name}.pt", digest, f"https://openaipublic.example/{digest}/{name}.pt",
                         "open_clip", meta={"model": name, "pretrained": "openai", "quick_gelu": True})
    monkeypatch.setattr(clip_frames, "tag_specs", lambda model: [openai] if model == name else [])
    before = set(clip_frames._CACHE)
    try:
        ex = create_extractor("clip", model=name, pretrained=str(path), device="cpu", count=2)
        assert ex.weights is openai and _activations(ex.model) == {QuickGELU}
        prov = ex.provenance()
        assert prov["options"]["pretrained"] == "openai" and prov["options"]["quick_gelu"] is True
        assert prov["variant"] == f"{name}.openai" and prov["weights"] == {"file": f"{name}.pt", "sha256": digest}
        for k, v in src.state_dict().items():
            torch.testing.assert_close(ex.model.state_dict()[k], v, rtol=0, atol=0)
        # an unidentified file: the activation cannot be read from the weights, so it must be stated
        other = tmp_path / "finetuned.pt"
        other.write_bytes(b"not loaded: the activation is decided before the file is read")
        with pytest.raises(ValueError, match=r"finetuned\.pt.*activation is unknown.*quick_gelu=True or False"):
            create_extractor("clip", model=name, pretrained=str(other), device="cpu")
        text = create_extractor("clip_text", model=name, pretrained=str(path), device="cpu")
        assert text.model is ex.model and text.provenance()["variant"] == f"{name}.openai"
    finally:
        for key in set(clip_frames._CACHE) - before:
            clip_frames._CACHE.pop(key)


def _torchscript_archive(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive whose state dict is `sd` plus OpenAI's JIT-only entries (the shape of ViT-B-32.pt)."""
    root = torch.nn.Module()
    for key, value in {**sd, "input_resolution": torch.tensor(224), "vocab_size": torch.tensor(49408)}.items():
        *mods, leaf = key.split(".")
        cur = root
        for m in mods:
            if not hasattr(cur, m):
                cur.add_module(m, torch.nn.Module())
            cur = getattr(cur, m)
        cur.register_buffer(leaf, value.half() if value.is_floating_point() else value)  # OpenAI ships fp16
    torch.jit.script(root).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's deprecation notice
def test_openai_torchscript_release_file_loads_only_when_pinned(tmp_path: Path) -> None:
    src = open_clip.create_model("ViT-S-32-alt", pretrained=None)  # small stand-in for OpenAI's ViT-B-32.pt
    path = _torchscript_archive(src.state_dict(), tmp_path / "ViT-S-32-alt.pt")
    assert is_torchscript(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.random.fork_rng():
        torch.manual_seed(9)
        dst = open_clip.create_model("ViT-S-32-alt", pretrained=None)
    load_clip_checkpoint(dst, path, WeightsSpec("t", path.name, digest, "u", "open_clip"))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v.half().float() if v.is_floating_point() else v)
    with pytest.raises(WeightsError, match="TorchScript archive.*full sha256"):
        load_clip_checkpoint(dst, path, WeightsSpec("t", path.name, "", "u", "open_clip"))
    with pytest.raises(WeightsError, match="TorchScript archive.*full sha256"):  # an explicit, unpinned archive
        load_clip_checkpoint(dst, path, WeightsSpec("t", path.name, "ab" * 32, "u", "open_clip"))
    plain = tmp_path / "sd.pt"
    torch.save(src.state_dict(), plain)
    assert not is_torchscript(plain)
    load_clip_checkpoint(dst, plain, WeightsSpec("t", plain.name, "", "u", "open_clip"))  # weights_only path
    torch.testing.assert_close(dst.state_dict()["text_projection"], src.state_dict()["text_projection"])


@pytest.mark.gpu
def test_cuda_fp16_close(pair: tuple[ClipFrames, ClipText]) -> None:
    c, _ = pair
    g = create_extractor("clip", random_init=True, device="cuda", half=True, count=4)
    f = frames(4)
    a, b = c.run_batch(f), g.run_batch(f)
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=3e-2, atol=3e-2 * float(np.abs(a).max()))
