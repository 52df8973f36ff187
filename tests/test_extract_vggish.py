"""VGGish: network, checkpoints, weights, PCA, the extractor (front end: test_extract_vggish_frontend.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from extract import WeightsError, create_extractor, vggish, vggish_frontend
from extract.decode import MediaInfo, probe
from store.schema import Status
from tests._extractors import oom_above
from tests._fakes import FakeWeightsFactory
from tests._media import write_audio, write_video

SR = 16000


# ---- network, checkpoint, PCA ----
def _synthetic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the real torchvggish key names and shapes (hard-coded here on purpose)."""
    shapes = {
        "features.0.weight": (64, 1, 3, 3), "features.0.bias": (64,),
        "features.3.weight": (128, 64, 3, 3), "features.3.bias": (128,),
        "features.6.weight": (256, 128, 3, 3), "features.6.bias": (256,),
        "features.8.weight": (256, 256, 3, 3), "features.8.bias": (256,),
        "features.11.weight": (512, 256, 3, 3), "features.11.bias": (512,),
        "features.13.weight": (512, 512, 3, 3), "features.13.bias": (512,),
        "embeddings.0.weight": (4096, 12288), "embeddings.0.bias": (4096,),
        "embeddings.2.weight": (4096, 4096), "embeddings.2.bias": (4096,),
        "embeddings.4.weight": (128, 4096), "embeddings.4.bias": (128,),
    }
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (1.0 / math.sqrt(max(1, math.prod(s[1:])))) for k, s in shapes.items()}


def test_network_shapes_and_key_names() -> None:
    torch.manual_seed(0)
    net = vggish.VGGishNet().eval()
    sd = net.state_dict()
    ref = _synthetic_state_dict()
    assert list(sd) == list(ref)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    out = net(torch.randn(3, 1, 96, 64))
    assert out.shape == (3, 128) and torch.isfinite(out).all()


def test_checkpoint_loading_and_variants(tmp_path) -> None:
    sd = _synthetic_state_dict(seed=3)
    path = tmp_path / "vggish-synthetic.pth"
    torch.save(sd, path)
    net = vggish.load_vggish(path)
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    noise = 0.3 * np.random.default_rng(0).standard_normal(int(2.2 * SR))  # seeded, a little over 2 examples
    x = vggish_frontend.waveform_to_examples(noise.astype(np.float32))
    tf = vggish.embed_examples(net, x, variant="tf")
    tv = vggish.embed_examples(net, x, variant="torchvggish")
    assert (tf < 0).any(), "random weights should give some negative pre-ReLU values"
    np.testing.assert_array_equal(tv, np.maximum(tf, 0))
    # the flatten order is TF's NHWC: check the first FC input against a manual permute
    with torch.no_grad():
        feats = net.features(torch.from_numpy(x[:1, None]))
        flat = feats[0].permute(1, 2, 0).reshape(-1)
        assert torch.allclose(net.embeddings[0](flat), net.embeddings[0](feats.permute(0, 2, 3, 1).flatten(1))[0])


def test_checkpoint_errors_name_the_file(tmp_path) -> None:
    sd = _synthetic_state_dict()
    del sd["embeddings.4.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*embeddings\.4\.bias"):
        vggish.load_vggish(bad)
    sd = _synthetic_state_dict()
    sd["features.0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"features\.0\.weight has shape"):
        vggish.load_vggish(bad)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_pca_file_and_formula(tmp_path, as_numpy: bool) -> None:
    rng = np.random.default_rng(5)
    e = rng.standard_normal((128, 128))
    mu = rng.standard_normal(128)
    path = tmp_path / "pca.pth"
    payload = {"pca_eigen_vectors": e, "pca_means": mu.reshape(128, 1)} if as_numpy else {
        "pca_eigen_vectors": torch.from_numpy(e), "pca_means": torch.from_numpy(mu)}
    torch.save(payload, path)
    vecs, means = vggish.load_pca(path)
    np.testing.assert_array_equal(vecs, e)
    np.testing.assert_array_equal(means, mu)
    x = rng.standard_normal((4, 128)) * 0.05
    trunc = vggish.pca_quantize(x, vecs, means, "truncate")
    rnd = vggish.pca_quantize(x, vecs, means, "round")
    # reference, element by element
    for n in range(4):
        for d in range(128):
            v = sum(e[d, j] * (x[n, j] - mu[j]) for j in range(128))
            s = (min(2.0, max(-2.0, v)) + 2.0) * 255.0 / 4.0
            assert trunc[n, d] == int(s)
            assert rnd[n, d] == round(s)  # Python round is half-to-even, as torch.round
    assert trunc.min() >= 0 and trunc.max() <= 255 and (trunc == 0).any() and (trunc == 255).any()
    assert (rnd != trunc).any()
    # 0..255 integers survive float16 exactly
    np.testing.assert_array_equal(trunc.astype(np.float16).astype(np.float32), trunc)


def test_pca_file_pickled_by_numpy1_loads(tmp_path) -> None:
    """The released PCA .pth (2019) holds ndarrays pickled by NumPy 1.x, naming `numpy.core.multiarray`."""
    import io

    rng = np.random.default_rng(6)
    e, mu = rng.standard_normal((128, 128)), rng.standard_normal((128, 1))
    buf = io.BytesIO()
    torch.save({"pca_eigen_vectors": e, "pca_means": mu}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    assert b"numpy._core.multiarray" in data  # protocol-2 GLOBAL lines: a plain rename gives NumPy 1's spelling
    path = tmp_path / "vggish_pca_params-legacy.pth"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    vecs, means = vggish.load_pca(path)
    np.testing.assert_array_equal(vecs, e)
    np.testing.assert_array_equal(means, mu[:, 0])


def test_pca_bad_file(tmp_path) -> None:
    p = tmp_path / "pca.pth"
    torch.save({"eigen": torch.zeros(128, 128)}, p)
    with pytest.raises(ValueError, match=r"pca\.pth.*pca_eigen_vectors"):
        vggish.load_pca(p)


def _pca_files(d, rng_seed: int = 8) -> tuple[np.ndarray, np.ndarray, dict[str, "object"]]:
    """The same PCA numbers written as TF's .npz (means (128,)) and torchvggish's .pth (ndarrays, means (128, 1))."""
    from pathlib import Path

    rng = np.random.default_rng(rng_seed)
    e, mu = rng.standard_normal((128, 128)) * 0.3, rng.standard_normal(128) * 0.1
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    npz = d / vggish.VGGISH_PCA_NPZ.filename
    np.savez(npz, pca_eigen_vectors=e, pca_means=mu)
    pth = d / vggish.VGGISH_PCA.filename
    torch.save({"pca_eigen_vectors": e, "pca_means": mu.reshape(128, 1)}, pth)
    return e, mu, {"npz": npz, "pth": pth}


def _pin_pca(monkeypatch, files: dict) -> dict[str, str]:
    """Pin the synthetic files in place of the published digests (each format keeps its own pin)."""
    digests = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()}
    pth = dataclasses.replace(vggish.VGGISH_PCA, sha256=digests["pth"][:8])
    npz = dataclasses.replace(vggish.VGGISH_PCA_NPZ, sha256=digests["npz"])
    mirror = dataclasses.replace(vggish.VGGISH_PCA_NPZ_MIRROR, sha256=digests["npz"])
    for name, value in (("VGGISH_PCA", pth), ("VGGISH_PCA_NPZ", npz), ("VGGISH_PCA_NPZ_MIRROR", mirror)):
        monkeypatch.setattr(vggish, name, value)
    return digests


def test_published_pca_pins() -> None:
    npz, mirror, pth = vggish.VGGISH_PCA_NPZ, vggish.VGGISH_PCA_NPZ_MIRROR, vggish.VGGISH_PCA
    assert len(npz.sha256) == 64 and npz.sha256 == mirror.sha256  # one file, two published names
    assert mirror.filename == f"vggish_pca_params-{npz.sha256[:8]}.npz"  # torchvggish's name carries its prefix
    assert pth.sha256 == "970ea276" and pth.filename == "vggish_pca_params-970ea276.pth"
    assert npz.url.endswith("/audioset/vggish_pca_params.npz") and npz.sha256 != pth.sha256


def test_pca_npz_and_pth_resolve_with_their_own_pins_and_postprocess_identically(tmp_path, monkeypatch,
                                                                                 no_weights_anywhere) -> None:
    e, mu, files = _pca_files(tmp_path / "both")
    digests = _pin_pca(monkeypatch, files)
    only = {}
    for kind, src in files.items():  # a weights dir holding only one of the two files
        only[kind] = tmp_path / kind
        only[kind].mkdir()
        (only[kind] / src.name).write_bytes(src.read_bytes())
        path, spec = vggish.resolve_pca(weights_dir=only[kind])
        assert path == only[kind] / src.name and spec.filename == src.name
        assert spec.sha256 == (digests[kind] if kind == "npz" else digests[kind][:8])
    assert vggish.resolve_pca(weights_dir=tmp_path / "both")[0] == files["pth"]  # both there: the .pth first
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / vggish.VGGISH_PCA_NPZ_MIRROR.filename).write_bytes(files["npz"].read_bytes())
    path, spec = vggish.resolve_pca(weights_dir=mirror)  # torchvggish's name for the npz: same identity
    from extract._weights import weights_identity

    assert weights_identity(path, spec) == {"file": "vggish_pca_params.npz", "sha256": digests["npz"]}
    x = np.random.default_rng(3).standard_normal((6, 128)) * 0.5
    outs = [vggish.pca_quantize(x, *vggish.load_pca(vggish.resolve_pca(weights_dir=only[k])[0])) for k in files]
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = np.floor((np.clip(np.einsum("dj,nj->nd", e, x - mu), -2.0, 2.0) + 2.0) * 63.75)  # TF's postprocess
    np.testing.assert_array_equal(outs[0], ref)
    assert 0 < len(np.unique(ref)) and (ref > 0).any() and (ref < 255).any()


def test_pca_pins_are_enforced_in_the_weights_dir_and_explicit_files_are_flagged(tmp_path, monkeypatch,
                                                                                 no_weights_anywhere) -> None:
    import warnings

    from extract import UnpinnedWeightsWarning
    from extract._weights import weights_identity

    _, _, files = _pca_files(tmp_path / "good")
    digests = _pin_pca(monkeypatch, files)
    _, _, other = _pca_files(tmp_path / "other", rng_seed=9)  # the same names, other numbers
    (tmp_path / "other" / vggish.VGGISH_PCA.filename).unlink()
    with pytest.raises(WeightsError, match="checksum mismatch.*vggish_pca_params.npz"):
        vggish.resolve_pca(weights_dir=tmp_path / "other")  # found by tvr: the npz pin holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind, src in files.items():  # either pinned file given explicitly: quiet, identified by its digest
            path, spec = vggish.resolve_pca(src)
            assert weights_identity(path, spec) == {"file": src.name, "sha256": digests[kind]}
    with pytest.warns(UnpinnedWeightsWarning, match=digests["npz"]):  # a foreign npz: used, with a warning
        path, spec = vggish.resolve_pca(other["npz"])
    assert spec.filename == "vggish_pca_params.npz"
    ident = weights_identity(path, spec)
    assert ident["unpinned"] is True and ident["sha256"] == hashlib.sha256(other["npz"].read_bytes()).hexdigest()
    ex = create_extractor("vggish", random_init=True, device="cpu")
    ex.random_init = False  # the PCA half of the real-weights path, without a 288 MB synthetic network file
    ex.weights_dir = tmp_path / "good"
    vecs, means = ex._load_pca(None)
    assert ex.weights_identity["pca"] == {"file": vggish.VGGISH_PCA.filename, "sha256": digests["pth"]}
    np.testing.assert_array_equal(means, vggish.load_pca(files["npz"])[1])


# ---- the extractor ----
def _info(duration: float, has_audio: bool = True, kind: str = "video",
          audio_duration: float = float("nan")) -> MediaInfo:
    """What probe says of an item `duration` s long (its audio track's own length when `audio_duration` is known)."""
    return MediaInfo("mem.mp4", kind, duration, kind != "audio", has_audio, audio_duration=audio_duration)


def _run(ex, audio: np.ndarray, info: MediaInfo, chunks: int = 5):
    """Stream `audio` through a session in uneven chunks."""
    s = ex.start(info)
    for c in np.array_split(audio, chunks):
        s.add_audio(c)
    return s.finish()


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Seeded noise plus a chirp, float32 16 kHz."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(t.shape[0]) + 0.3 * np.sin(2 * np.pi * (200 * t + 300 * t**2))).astype(
        np.float32)


@pytest.fixture(scope="module")
def tiny_ex():
    """Random-weight extractor (seeded), float32 on disk so values compare tightly."""
    return create_extractor("vggish", random_init=True, seed=7, max_steps=8, batch_size=3, dtype="float32",
                            device="cpu")


def test_extractor_stream_matches_one_shot(tiny_ex) -> None:
    x = _audio(4.0)
    row = _run(tiny_ex, x, _info(4.0))
    assert row.status == Status.OK and row.reason == ""
    assert row.values.shape == (4, 128) and row.values.dtype == np.float32
    np.testing.assert_allclose(row.times, np.arange(4) * 0.96, atol=1e-6)
    ref = vggish.embed_examples(tiny_ex.net, vggish_frontend.waveform_to_examples(x), variant="tf")
    np.testing.assert_allclose(row.values, ref, atol=1e-5, rtol=1e-5)
    assert row.mask is None or row.mask.all()
    prov = tiny_ex.provenance()
    assert prov["weights"] == {"random": True, "seed": 7} and prov["variant"] == "tf"
    assert prov["options"]["pca"] is False and prov["preset"] == "vggish_logmel"
    assert tiny_ex.spec.modality == "audio" and tiny_ex.spec.max_steps == 8 and tiny_ex.spec.dim == 128


def test_extractor_determinism_and_variants(tiny_ex) -> None:
    x = _audio(2.0, seed=3)
    a = _run(tiny_ex, x, _info(2.0), chunks=2).values
    twin = create_extractor("vggish", random_init=True, seed=7, max_steps=8, dtype="float32", device="cpu")
    np.testing.assert_array_equal(_run(twin, x, _info(2.0), chunks=7).values, a)
    tv = create_extractor("vggish", random_init=True, seed=7, variant="torchvggish", dtype="float32", device="cpu")
    assert tv.provenance()["variant"] == "torchvggish"
    np.testing.assert_array_equal(_run(tv, x, _info(2.0)).values, np.maximum(a, 0))
    assert (a < 0).any()
    with pytest.raises(ValueError, match="variant"):
        create_extractor("vggish", random_init=True, variant="keras")


def test_extractor_pca_option() -> None:
    ex = create_extractor("vggish", random_init=True, seed=1, pca=True, pca_quantize="round", device="cpu")
    row = _run(ex, _audio(2.0), _info(2.0))
    v = row.values.astype(np.float32)
    assert row.values.dtype == np.float16 and v.shape == (2, 128)
    assert np.all(v == np.round(v)) and v.min() >= 0 and v.max() <= 255
    raw = vggish.embed_examples(ex.net, vggish_frontend.waveform_to_examples(_audio(2.0)), variant="tf")
    np.testing.assert_array_equal(v, vggish.pca_quantize(raw, *ex.pca_params, mode="round"))
    prov = ex.provenance()
    assert prov["options"]["pca"] is True and prov["options"]["pca_quantize"] == "round"
    assert prov["weights"]["pca"] == {"random": True, "seed": 1}


def test_absent_no_audio_and_too_short(tiny_ex) -> None:
    row = tiny_ex.start(_info(3.0, has_audio=False)).finish()
    assert row.status == Status.ABSENT and row.reason == "no_audio" and row.values.shape == (0, 128)
    row = tiny_ex.start(_info(0.0, has_audio=False, kind="image")).finish()
    assert row.reason == "no_audio"
    short = _audio(1.0)[:15599]
    row = _run(tiny_ex, short, _info(0.97))
    assert row.status == Status.ABSENT and row.reason == "too_short" and "15599" in row.message
    row = _run(tiny_ex, _audio(1.0)[:15600], _info(0.975))
    assert row.status == Status.OK and row.values.shape == (1, 128)


def test_max_steps_spreads_uniformly_and_skips_unused_examples(tiny_ex, monkeypatch) -> None:
    x = _audio(12.0)  # 12 examples, max_steps 8
    n = vggish_frontend.num_examples(x.shape[0])
    assert n == 12
    keep = vggish.select_examples(n, 8)
    np.testing.assert_array_equal(keep, [0, 2, 3, 5, 6, 8, 9, 11])
    full = vggish.embed_examples(tiny_ex.net, vggish_frontend.waveform_to_examples(x), variant="tf")
    seen: list[int] = []
    real_embed = tiny_ex.embed
    monkeypatch.setattr(tiny_ex, "embed", lambda e: (seen.append(e.shape[0]), real_embed(e))[1])
    planned = _run(tiny_ex, x, _info(12.0), chunks=9)  # duration known: only the kept examples are embedded
    assert sum(seen) == 8
    seen.clear()
    unplanned = _run(tiny_ex, x, _info(float("nan")), chunks=4)  # unknown duration: embed all, pick at the end
    assert sum(seen) == 12
    for row in (planned, unplanned):
        assert row.values.shape == (8, 128)
        np.testing.assert_allclose(row.times, keep * 0.96, atol=1e-5)
        np.testing.assert_allclose(row.values, full[keep], atol=1e-5, rtol=1e-5)


def test_a_shorter_audio_track_is_planned_by_its_own_duration(tiny_ex, tmp_path) -> None:
    # 12 s of video, 6 s of audio: planning by the video's 12 s keeps examples [0 2 3 5 6 8 9 11] and only the first
    # four exist; by the audio's own 6 s all 6 examples fit max_steps 8
    pcm = np.round(_audio(6.0) * 32767).astype(np.int16)
    row = _run(tiny_ex, pcm.astype(np.float32) / 32768.0, _info(12.0, audio_duration=6.0), chunks=3)
    assert row.values.shape == (6, 128)
    np.testing.assert_allclose(row.times, np.arange(6) * 0.96, atol=1e-5)
    video = tmp_path / "long_video_short_audio.mkv"  # the same through probe and the decoder
    write_video(video, _grey_frames(300), audio=pcm, sample_rate=SR)
    info = probe(video)
    assert info.duration == pytest.approx(12.0, abs=0.05) and info.audio_duration == pytest.approx(6.0, abs=0.05)
    np.testing.assert_allclose(tiny_ex.extract_path(video).values, row.values, atol=1e-5, rtol=1e-5)


def test_vggish_cuda_oom_halves_the_batch_and_retries() -> None:
    x = _audio(6.0)
    ref = create_extractor("vggish", random_init=True, seed=7, batch_size=4, dtype="float32", device="cpu")
    oom = create_extractor("vggish", random_init=True, seed=7, batch_size=4, dtype="float32", device="cpu")
    seen: list[int] = []
    oom.embed = oom_above(1, oom.embed, seen)  # type: ignore[method-assign]
    want, got = _run(ref, x, _info(6.0), chunks=1), _run(oom, x, _info(6.0), chunks=1)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)  # conv sums differ by batch size
    assert seen[:3] == [4, 2, 1] and oom.batch_size == 1 and sum(n for n in seen if n <= 1) == len(want.values)


def test_real_weight_path_with_synthetic_files(tmp_path, monkeypatch, fake_weights: FakeWeightsFactory) -> None:
    digest = fake_weights(_synthetic_state_dict(seed=11), "vggish-10086976.pth").sha256
    with pytest.raises(WeightsError, match="checksum mismatch"):  # the pinned digest guards the real file name
        create_extractor("vggish", weights_dir=tmp_path, device="cpu")
    monkeypatch.setattr(vggish, "VGGISH_WEIGHTS", dataclasses.replace(vggish.VGGISH_WEIGHTS, sha256=digest))
    rng = np.random.default_rng(2)
    pca_digest = fake_weights({"pca_eigen_vectors": torch.from_numpy(rng.standard_normal((128, 128))),
                               "pca_means": torch.from_numpy(rng.standard_normal(128))},
                              "vggish_pca_params-970ea276.pth").sha256
    with pytest.raises(WeightsError, match="sha256 prefix"):  # prefix 970ea276 from the file name is checked
        create_extractor("vggish", weights_dir=tmp_path, pca=True, device="cpu")
    monkeypatch.setattr(vggish, "VGGISH_PCA", dataclasses.replace(vggish.VGGISH_PCA, sha256=pca_digest))
    ex = create_extractor("vggish", weights_dir=tmp_path, pca=True, device="cpu")
    prov = ex.provenance()["weights"]
    assert prov["file"] == "vggish-10086976.pth" and prov["sha256"] == digest
    assert prov["pca"] == {"file": "vggish_pca_params-970ea276.pth", "sha256": pca_digest}
    loaded = ex.net.state_dict()["embeddings.4.weight"]
    assert torch.equal(loaded, _synthetic_state_dict(seed=11)["embeddings.4.weight"])


# ---- through the decoder (extract.decode) ----
def _grey_frames(n: int) -> np.ndarray:
    """uint8 (n, 32, 32, 3): frame k is flat grey 7k mod 256 (a tiny video track beside the audio)."""
    return np.stack([np.full((32, 32, 3), (7 * k) % 256, np.uint8) for k in range(n)])


def test_extract_path_through_the_decoder(tiny_ex, tmp_path) -> None:
    pcm = np.round(_audio(3.0, seed=4) * 32767).astype(np.int16)
    wav = tmp_path / "speech.wav"
    write_audio(wav, pcm, SR)
    row = tiny_ex.extract_path(wav)
    assert row.status == Status.OK and row.values.shape == (3, 128)
    np.testing.assert_allclose(row.times, [0.0, 0.96, 1.92], atol=1e-6)
    exact = pcm.astype(np.float32) / 32768.0  # what the decoder must hand over for 16 kHz s16 input
    ref = vggish.embed_examples(tiny_ex.net, vggish_frontend.waveform_to_examples(exact), variant="tf")
    np.testing.assert_allclose(row.values, ref, atol=1e-5, rtol=1e-5)
    # a video file with a PCM track gives the same row; one without audio is ABSENT no_audio
    both = tmp_path / "both.mkv"
    write_video(both, _grey_frames(75), audio=pcm, sample_rate=SR)
    np.testing.assert_allclose(tiny_ex.extract_path(both).values, row.values, atol=1e-5, rtol=1e-5)
    silent = tmp_path / "silent.mkv"
    write_video(silent, _grey_frames(25))
    row = tiny_ex.extract_path(silent)
    assert (row.status, row.reason) == (Status.ABSENT, "no_audio")
    short = tmp_path / "short.wav"
    write_audio(short, pcm[:8000], SR)  # 0.5 s < 0.975 s
    row = tiny_ex.extract_path(short)
    assert (row.status, row.reason) == (Status.ABSENT, "too_short") and "8000 audio samples" in row.message


def test_non_finite_embeddings_are_an_error(tiny_ex, monkeypatch) -> None:
    monkeypatch.setattr(tiny_ex, "embed", lambda e: np.full((e.shape[0], 128), np.inf, np.float32))
    with pytest.raises(ValueError, match="vggish: mem.mp4: the model produced NaN/inf"):
        _run(tiny_ex, _audio(2.0), _info(2.0))
