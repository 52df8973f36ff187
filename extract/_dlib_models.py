"""dlib's model files: pinned WeightsSpecs and their location in the `face_recognition_models` wheel.

`import face_recognition_models` runs `pkg_resources`, which setuptools >= 81 no longer ships, so the package's
model directory is found WITHOUT importing it: from its installed-file list (`importlib.metadata.files`), else from
its import spec (`importlib.util.find_spec` does not execute a top-level package). The digests are those of
face_recognition_models 0.3.0's files (the ones pip installs; also in its wheel RECORD); every load checks them.

Resolution order: explicit path > weights dir (`weights_dir` / $TVR_WEIGHTS_DIR) > the installed wheel.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from extract._api import WeightsSpec
from extract._weights import ENV_WEIGHTS_DIR, WeightsNotFound, resolve_weights, weights_identity

PACKAGE = "face_recognition_models"
_DLIB_FILES = "http://dlib.net/files/"
_META = {"package": "face_recognition_models 0.3.0", "license": "CC0 (dlib models; the 68-point one: non-commercial)"}

RECOGNITION = WeightsSpec(
    name="dlib_face_recognition_resnet_model_v1",
    filename="dlib_face_recognition_resnet_model_v1.dat",
    sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    url=_DLIB_FILES + "dlib_face_recognition_resnet_model_v1.dat.bz2",
    preset="dlib_face_chip",
    meta=_META,
)
LANDMARKS_5 = WeightsSpec(
    name="shape_predictor_5_face_landmarks",
    filename="shape_predictor_5_face_landmarks.dat",
    sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    url=_DLIB_FILES + "shape_predictor_5_face_landmarks.dat.bz2",
    preset="dlib_face_chip",
    meta=_META,
)
LANDMARKS_68 = WeightsSpec(
    name="shape_predictor_68_face_landmarks",
    filename="shape_predictor_68_face_landmarks.dat",
    sha256="fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
    url=_DLIB_FILES + "shape_predictor_68_face_landmarks.dat.bz2",
    preset="dlib_face_chip",
    meta=_META,
)
MMOD_DETECTOR = WeightsSpec(
    name="mmod_human_face_detector",
    filename="mmod_human_face_detector.dat",
    sha256="4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
    url=_DLIB_FILES + "mmod_human_face_detector.dat.bz2",
    preset="dlib_face_chip",
    meta=_META,
)
ALL_MODELS = (RECOGNITION, LANDMARKS_5, LANDMARKS_68, MMOD_DETECTOR)


def package_models_dir() -> Path | None:
    """`.../face_recognition_models/models` of the installed wheel (not imported), or None when not installed."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == RECOGNITION.filename:
            return Path(str(f.locate())).resolve().parent
    spec = importlib.util.find_spec(PACKAGE)  # no metadata (e.g. a source checkout on sys.path)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "models").is_dir():
                return Path(loc) / "models"
    return None


def resolve_dlib_model(
    spec: WeightsSpec, *, path: str | os.PathLike[str] | None = None, weights_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, str]]:
    """(verified path, {"file", "sha256"}) of one model file, in the module's resolution order."""
    if path is None:
        wdir = weights_dir if weights_dir is not None else os.environ.get(ENV_WEIGHTS_DIR) or None
        if wdir is None or not (Path(wdir).expanduser() / spec.filename).is_file():
            pkg = package_models_dir()
            if pkg is not None and (pkg / spec.filename).is_file():
                weights_dir = pkg
    try:
        p = resolve_weights(spec, path=path, weights_dir=weights_dir)
    except WeightsNotFound as exc:  # stays a WeightsNotFound, so random_init="missing" reports it properly
        raise WeightsNotFound(
            f"{exc}. The usual source is `pip install {PACKAGE}` (found by tvr without importing it)", spec
        ) from None
    return p, weights_identity(p, spec)
