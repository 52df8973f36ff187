"""dlib's model files: pinned WeightsSpecs, shipped by the `face_recognition_models` wheel.

The digests are those of face_recognition_models 0.3.0's files (the ones pip installs; also in its wheel RECORD);
every load checks them. The files resolve like every tvr weights file (extract._weights): explicit path > weights
dir (`weights_dir` / $TVR_WEIGHTS_DIR) > the installed package (`WeightsSpec.package`, found without importing it:
its own import needs pkg_resources, which setuptools >= 81 no longer ships).
"""
from __future__ import annotations

import os
from pathlib import Path

from extract import _weights
from extract._weights import WeightsSpec, weights_identity

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
    package=PACKAGE,
)
LANDMARKS_5 = WeightsSpec(
    name="shape_predictor_5_face_landmarks",
    filename="shape_predictor_5_face_landmarks.dat",
    sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    url=_DLIB_FILES + "shape_predictor_5_face_landmarks.dat.bz2",
    preset="dlib_face_chip",
    meta=_META,
    package=PACKAGE,
)
LANDMARKS_68 = WeightsSpec(
    name="shape_predictor_68_face_landmarks",
    filename="shape_predictor_68_face_landmarks.dat",
    sha256="fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
    url=_DLIB_FILES + "shape_predictor_68_face_landmarks.dat.bz2",
    preset="dlib_face_chip",
    meta=_META,
    package=PACKAGE,
)
MMOD_DETECTOR = WeightsSpec(
    name="mmod_human_face_detector",
    filename="mmod_human_face_detector.dat",
    sha256="4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
    url=_DLIB_FILES + "mmod_human_face_detector.dat.bz2",
    preset="dlib_face_chip",
    meta=_META,
    package=PACKAGE,
)
ALL_MODELS = (RECOGNITION, LANDMARKS_5, LANDMARKS_68, MMOD_DETECTOR)


def resolve_dlib_model(
    spec: WeightsSpec, *, path: str | os.PathLike[str] | None = None, weights_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, str]]:
    """(verified path, {"file", "sha256"}) of one model file, in extract._weights' resolution order."""
    p = _weights.resolve_weights(spec, path=path, weights_dir=weights_dir)
    return p, weights_identity(p, spec)
