"""VGGish audio embeddings: 128-d per 0.96 s example, TF (pre-ReLU) or torchvggish (post-ReLU) variant, optional PCA.

Network and key names follow the torchvggish port (`features.{0,3,6,8,11,13}` convs, `embeddings.{0,2,4}` linears)
so `vggish-10086976.pth` loads as is. PCA parameters (`pca_eigen_vectors` (128, 128), `pca_means` (128,)) come from
either published file, each checked against its own pin (`pca_specs()`): torchvggish's `vggish_pca_params-970ea276.pth`
(sha256 prefix 970ea276, from its name; no full digest is published) or TF AudioSet's `vggish_pca_params.npz`
(full sha256 4d878af3..., also re-released by torchvggish as `vggish_pca_params-4d878af3.npz`).

Variants (recorded in provenance):
- `variant="tf"` (default): the TF embedding tensor, taken before the final ReLU (TF's fc2 has no activation).
- `variant="torchvggish"`: after the final ReLU, as torchvggish and video_features return it (values >= 0).
PCA (`pca=True`, off by default): E·(x − μ), clip to [-2, 2], scale to [0, 255] (·255/4), then either truncate
(`pca_quantize="truncate"`, TF's `astype(uint8)`) or round half to even (`"round"`, torchvggish's `torch.round`).
Quantised values are integers 0..255, which float16 stores exactly; raw embeddings lose ~3 decimal digits in float16
(the default dtype, `dtype="float32"` keeps them whole).

Absent rows: no audio stream (or an image) -> ABSENT "no_audio"; audio shorter than one example (15,600 samples =
0.975 s at 16 kHz, the TF framing) -> ABSENT "too_short". Short audio is NOT zero-padded (TF VGGish returns no
example for it either), and a trailing partial example of longer audio is dropped, so every stored step is 0.96 s of
real audio. Step i is the example starting at i·0.96 s; beyond `max_steps` examples, `max_steps` are kept, one from
the middle of each equal segment.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from extract import _weights
from extract import vggish_frontend as fe
from extract._api import Extractor, PooledSession, WeightsSpec, to_store_dtype
from extract._registry import register_extractor
from extract.engine import BatchPool, lower_attr, run_halving, shared_pool
from extract._weights import WeightsNotFound, expected_digest, sha256_file, weights_identity
from extract.transforms import register_preset
from store.schema import FeatureRows, FeatureSpec, Status

if TYPE_CHECKING:
    from extract.decode import MediaInfo

EMBEDDING_SIZE = 128
VARIANTS = ("tf", "torchvggish")
QUANTIZE_MODES = ("truncate", "round")
PCA_CLIP = 2.0  # TF QUANTIZE_MIN_VAL = -2, QUANTIZE_MAX_VAL = +2
_CONV_CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
# (key, shape) of every tensor in the torchvggish state dict, in order.
STATE_DICT_SHAPES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("features.0.weight", (64, 1, 3, 3)),
    ("features.0.bias", (64,)),
    ("features.3.weight", (128, 64, 3, 3)),
    ("features.3.bias", (128,)),
    ("features.6.weight", (256, 128, 3, 3)),
    ("features.6.bias", (256,)),
    ("features.8.weight", (256, 256, 3, 3)),
    ("features.8.bias", (256,)),
    ("features.11.weight", (512, 256, 3, 3)),
    ("features.11.bias", (512,)),
    ("features.13.weight", (512, 512, 3, 3)),
    ("features.13.bias", (512,)),
    ("embeddings.0.weight", (4096, 512 * 4 * 6)),
    ("embeddings.0.bias", (4096,)),
    ("embeddings.2.weight", (4096, 4096)),
    ("embeddings.2.bias", (4096,)),
    ("embeddings.4.weight", (EMBEDDING_SIZE, 4096)),
    ("embeddings.4.bias", (EMBEDDING_SIZE,)),
)


class VGGishNet(nn.Module):
    """The VGGish VGG: 6 convs + 4 max-pools over a (N, 1, 96, 64) log-mel example, then FC 4096 → 4096 → 128."""

    def __init__(self) -> None:
        """Layers laid out as in torchvggish so its state dict keys match one to one."""
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for v in _CONV_CHANNELS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_SIZE),
            nn.ReLU(inplace=True),  # torchvggish's final ReLU; the TF embedding is taken before it
        )

    def forward(self, x: torch.Tensor, variant: str = "tf") -> torch.Tensor:
        """(N, 1, 96, 64) log-mel -> (N, 128); `variant="tf"` skips the final ReLU."""
        if variant not in VARIANTS:
            raise ValueError(f"vggish: variant must be one of {VARIANTS}, got {variant!r}")
        x = self.features(x)
        # TF flattens NHWC: (N, C, 6, 4) -> (N, 6, 4, C) so the first FC sees TF's element order.
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = self.embeddings[:5](x)
        return torch.relu(x) if variant == "torchvggish" else x


def _torch_load(path: Path, what: str) -> Any:
    """`torch.load` with weights_only, also accepting pickled NumPy arrays (as some PCA files hold)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - retried with NumPy types allow-listed, then reported
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot load the {what} ({first}; {exc}); is this a torch .pth file?") from exc


def _numpy_safe_globals() -> list[Any]:
    """The NumPy types an ndarray pickle refers to, for `torch.serialization.safe_globals`.

    The released PCA file was pickled by NumPy 1.x, whose pickles name `numpy.core.multiarray._reconstruct`;
    NumPy 2 moved it to `numpy._core`, so the old spelling is allow-listed explicitly as (object, name) pairs.
    """
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        obj = getattr(core.multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out.append((obj, f"{module}.{name}"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def _check_state_dict(sd: Mapping[str, Any], path: Path | str) -> dict[str, torch.Tensor]:
    """The state dict as float32 tensors, or ValueError naming missing/extra/misshapen keys."""
    expected = dict(STATE_DICT_SHAPES)
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        raise ValueError(
            f"{path}: not a torchvggish VGGish state dict (missing keys {missing[:4]}, unexpected keys {extra[:4]}); "
            "use vggish-10086976.pth from https://github.com/harritaylor/torchvggish/releases/tag/v0.1"
        )
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        t = torch.as_tensor(np.asarray(sd[key]) if not isinstance(sd[key], torch.Tensor) else sd[key])
        if tuple(t.shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, VGGish needs {shape}")
        out[key] = t.to(torch.float32)
    return out


def load_vggish(path: Path | str) -> VGGishNet:
    """A VGGishNet with the torchvggish checkpoint at `path` loaded (CPU, eval mode)."""
    path = Path(path)
    sd = _torch_load(path, "VGGish checkpoint")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping), got {type(sd).__name__}")
    net = VGGishNet()
    net.load_state_dict(_check_state_dict(sd, path))
    return net.eval()


def load_pca(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(eigen_vectors (128, 128), means (128,)) float64 from a torchvggish PCA `.pth` (or TF `.npz`) file."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            params: Mapping[str, Any] = {k: z[k] for k in z.files}
    else:
        params = _torch_load(path, "VGGish PCA parameters")
    if not isinstance(params, Mapping) or not {"pca_eigen_vectors", "pca_means"} <= set(params):
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"{path}: VGGish PCA file needs keys 'pca_eigen_vectors' and 'pca_means', found {keys}; "
            "use vggish_pca_params-970ea276.pth (torchvggish v0.1 release) or TF AudioSet's vggish_pca_params.npz"
        )
    vecs = _as_f64(params["pca_eigen_vectors"])
    means = _as_f64(params["pca_means"]).reshape(-1)
    if vecs.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or means.shape != (EMBEDDING_SIZE,):
        raise ValueError(f"{path}: PCA shapes {vecs.shape}, {means.shape}; need (128, 128) and (128,)")
    return vecs, means


def _as_f64(v: Any) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64)


def pca_quantize(
    emb: np.ndarray, eigen_vectors: np.ndarray, means: np.ndarray, mode: str = "truncate"
) -> np.ndarray:
    """AudioSet post-processing: E·(x − μ), clip [-2, 2], ·255/4, truncate or round -> float32 (N, 128) in 0..255."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"vggish: pca_quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    x = np.asarray(emb, dtype=np.float64)
    pca = (eigen_vectors @ (x.T - means[:, None])).T
    scaled = (np.clip(pca, -PCA_CLIP, PCA_CLIP) + PCA_CLIP) * (255.0 / (2 * PCA_CLIP))
    # TF casts with astype(uint8) (truncation toward zero; values are >= 0); torchvggish uses round-half-even.
    q = np.floor(scaled) if mode == "truncate" else np.round(scaled)
    return q.astype(np.float32)


def embed_examples(
    net: VGGishNet, examples: np.ndarray, *, variant: str = "tf", device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> np.ndarray:
    """(N, 96, 64) log-mel examples -> (N, 128) float32 embeddings, in batches, no grad."""
    out = np.zeros((examples.shape[0], EMBEDDING_SIZE), dtype=np.float32)
    dtype = next(net.parameters()).dtype  # fp16 when the extractor runs half on CUDA
    with torch.inference_mode():
        for s in range(0, examples.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(examples[s : s + batch_size], dtype=np.float32))
            x = x[:, None].to(device=device, dtype=dtype)
            out[s : s + x.shape[0]] = net(x, variant=variant).float().cpu().numpy()
    return out


# ---- the extractor ----------------------------------------------------------------------------------------------
VGGISH_WEIGHTS = WeightsSpec(
    name="AUDIOSET_TORCHVGGISH_V0_1",
    filename="vggish-10086976.pth",
    sha256="10086976245803799d9194e9a73d9b6c1549c71d1b80106f5cade5608a561f4b",
    url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
    preset="vggish_logmel",
    meta={"source": "TF AudioSet vggish_model.ckpt ported by torchvggish", "license": "Apache-2.0"},
)
# Full digest not published anywhere we could check: the 8-hex file-name prefix is verified, as torch.hub does.
VGGISH_PCA = WeightsSpec(
    name="AUDIOSET_PCA_V0_1",
    filename="vggish_pca_params-970ea276.pth",
    sha256="970ea276",
    url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish_pca_params-970ea276.pth",
    preset="vggish_logmel",
    meta={"keys": ("pca_eigen_vectors", "pca_means"), "format": "pth"},
)
# TF AudioSet's own file. Digest: the sha256 of video_features' copy (models/vggish/checkpoints), which starts with the
# 4d878af3 in torchvggish's re-release name and whose md5 c80cae69... is the one openmic-2018 pins for Google's file.
_NPZ_SHA256 = "4d878af3e306defbfb37095365aa7e5a6cecb86bad13e859e626151c4e6a8b9d"
VGGISH_PCA_NPZ = WeightsSpec(
    name="AUDIOSET_PCA_TF_NPZ",
    filename="vggish_pca_params.npz",
    sha256=_NPZ_SHA256,
    url="https://storage.googleapis.com/audioset/vggish_pca_params.npz",
    preset="vggish_logmel",
    meta={"keys": ("pca_eigen_vectors", "pca_means"), "format": "npz"},
)
VGGISH_PCA_NPZ_MIRROR = WeightsSpec(  # the same bytes under torchvggish's release name
    name="AUDIOSET_PCA_TF_NPZ_MIRROR",
    filename="vggish_pca_params-4d878af3.npz",
    sha256=_NPZ_SHA256,
    url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish_pca_params-4d878af3.npz",
    preset="vggish_logmel",
    meta={"keys": ("pca_eigen_vectors", "pca_means"), "format": "npz"},
)


def pca_specs() -> tuple[WeightsSpec, ...]:
    """The published PCA files, in lookup order (only the .pth is ever downloaded)."""
    return VGGISH_PCA, VGGISH_PCA_NPZ, VGGISH_PCA_NPZ_MIRROR


register_preset(
    "vggish_logmel",
    "16 kHz mono; 400-sample periodic Hann, hop 160, |rfft 512|; 64 HTK mel bands 125-7500 Hz (TF mel_features); "
    "log(mel + 0.01); non-overlapping 96-frame examples (0.96 s)",
)


@register_extractor("vggish")
class VGGishExtractor(Extractor):
    """VGGish 128-d embeddings of consecutive 0.96 s audio examples; step i starts at i·0.96 s."""

    needs_frames: ClassVar[bool] = False
    needs_audio: ClassVar[bool] = True

    def __init__(
        self,
        *,
        variant: str = "tf",
        pca: bool = False,
        pca_quantize: str = "truncate",
        pca_path: str | os.PathLike[str] | None = None,
        max_steps: int = 256,
        batch_size: int = 32,
        dtype: str = "float16",
        **kw: Any,
    ) -> None:
        """`variant` "tf" (pre-ReLU) | "torchvggish" (post-ReLU); `pca` applies AudioSet PCA + 8-bit quantisation."""
        super().__init__(**kw)
        if variant not in VARIANTS:
            raise ValueError(f"vggish: variant must be one of {VARIANTS}, got {variant!r}")
        if pca_quantize not in QUANTIZE_MODES:
            raise ValueError(f"vggish: pca_quantize must be one of {QUANTIZE_MODES}, got {pca_quantize!r}")
        if max_steps < 1 or batch_size < 1:
            raise ValueError(f"vggish: max_steps and batch_size must be >= 1, got {max_steps}, {batch_size}")
        self.spec = FeatureSpec(name="vggish", dim=EMBEDDING_SIZE, max_steps=int(max_steps), dtype=dtype,
                                modality="audio")
        self.batch_size = int(batch_size)
        self.embedding = variant
        self.pca = bool(pca)
        self.quantize = pca_quantize
        # Both files are resolved before either loads: one real-or-random decision for the whole extractor.
        self.resolve(VGGISH_WEIGHTS, "torch", path=self.weights_path)
        if self.pca:
            self._find_pca(pca_path)
        self.net = self.build_model(VGGishNet, VGGISH_WEIGHTS, hub="torch", load=_load_into)
        self.variant = variant
        self.pca_params: tuple[np.ndarray, np.ndarray] | None = None
        if self.pca:
            self.pca_params = self._load_pca(pca_path)
        self.options = {
            "pca": self.pca, "pca_quantize": self.quantize if self.pca else None, "max_steps": self.spec.max_steps,
            "example_seconds": fe.EXAMPLE_SECONDS, "sample_rate": fe.SAMPLE_RATE,
        }

    def _find_pca(self, pca_path: str | os.PathLike[str] | None) -> tuple[Path, WeightsSpec] | None:
        """The PCA file and its spec through the extractor's resolver (`resolve_pca`'s order); None = random."""
        return self.resolve_with(f"pca|{pca_path}", lambda: resolve_pca(
            pca_path, weights_dir=self.weights_dir, allow_download=self.allow_download))

    def _load_pca(self, pca_path: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray]:
        """Real PCA params (resolved like the weights, sha256-prefix checked), or seeded random ones."""
        found = self._find_pca(pca_path)
        if found is None:
            rng = np.random.default_rng(self.seed)
            q, _ = np.linalg.qr(rng.standard_normal((EMBEDDING_SIZE, EMBEDDING_SIZE)))
            self.weights_identity["pca"] = {"random": True, "seed": self.seed}
            return q, rng.standard_normal(EMBEDDING_SIZE) * 0.1
        path, spec = found
        self.weights_identity["pca"] = weights_identity(path, spec)
        return load_pca(path)

    def embed(self, examples: np.ndarray) -> np.ndarray:
        """(N, 96, 64) log-mel examples -> (N, 128) float32 in the configured variant (and PCA when on)."""
        out = embed_examples(self.net, examples, variant=self.embedding, device=self.device,
                             batch_size=self.batch_size)
        if self.pca_params is not None:
            out = pca_quantize(out, *self.pca_params, mode=self.quantize)
        return out

    def run_pooled(self, examples: list[np.ndarray]) -> np.ndarray:
        """A batch of examples (of one or several items) -> embeddings; a CUDA OOM halves it and lowers batch_size."""
        return run_halving(self.embed, np.stack(examples), lower_attr(self, "batch_size"), "vggish")

    def example_pool(self) -> BatchPool:
        """The pool every session queues its examples in: batches of `batch_size` examples, filled by several
        items when a worker has several in flight."""
        return shared_pool(self, lambda: BatchPool("vggish", lambda: self.batch_size, self.run_pooled,
                                                   overlap=self.overlaps_host))

    def start(self, info: MediaInfo) -> PooledSession:
        """A streaming session for one item."""
        return VGGishSession(self, info)


def resolve_pca(
    pca_path: str | os.PathLike[str] | None = None,
    *,
    weights_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = False,
) -> tuple[Path, WeightsSpec]:
    """The PCA file and the spec it answers to: an explicit file by its digest (else by suffix, accepted unpinned
    with a warning), else the first of `pca_specs()` found locally, else the .pth download (when allowed)."""
    if pca_path is not None:
        p = Path(pca_path).expanduser()
        spec = pca_spec_for(p) if p.is_file() else VGGISH_PCA
        return _weights.resolve_weights(spec, path=p), _canonical(spec)
    for spec in pca_specs():
        try:
            return _weights.resolve_weights(spec, weights_dir=weights_dir, hub="torch"), _canonical(spec)
        except WeightsNotFound:
            continue
    try:
        return _weights.resolve_weights(VGGISH_PCA, weights_dir=weights_dir, hub="torch",
                                        allow_download=allow_download), VGGISH_PCA
    except WeightsNotFound as exc:
        raise WeightsNotFound(f"{exc}. TF AudioSet's {VGGISH_PCA_NPZ.filename} (sha256 {VGGISH_PCA_NPZ.sha256}, "
                              f"{VGGISH_PCA_NPZ.url}) works as well", VGGISH_PCA) from None


def _canonical(spec: WeightsSpec) -> WeightsSpec:
    """One identity for the npz bytes, whichever of their two published names they were found under."""
    return VGGISH_PCA_NPZ if spec.filename == VGGISH_PCA_NPZ_MIRROR.filename else spec


def pca_spec_for(path: Path) -> WeightsSpec:
    """The PCA spec whose pin `path` matches; else the spec of its format (.npz or .pth), which will not match."""
    digest = sha256_file(path)
    for spec in pca_specs():
        pin = expected_digest(spec)
        if pin and digest.startswith(pin):
            return spec
    return VGGISH_PCA_NPZ if path.suffix == ".npz" else VGGISH_PCA


def _load_into(model: nn.Module, path: Path) -> None:
    """build_model loader: the checked torchvggish state dict into `model`."""
    sd = _torch_load(path, "VGGish checkpoint")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping), got {type(sd).__name__}")
    model.load_state_dict(_check_state_dict(sd, path))


def select_examples(n: int, max_steps: int) -> np.ndarray:
    """Indices of the examples kept: all when n <= max_steps, else one per equal segment (its middle)."""
    if n <= max_steps:
        return np.arange(n, dtype=np.int64)
    return np.floor((np.arange(max_steps) + 0.5) * (n / max_steps)).astype(np.int64)


class VGGishSession(PooledSession):
    """Streams audio chunks into examples and queues them (keyed by example index) in the extractor's example pool,
    shared with other items' sessions; only a sub-example remainder is kept."""

    def __init__(self, ex: VGGishExtractor, info: MediaInfo) -> None:
        """Plan which examples to compute from the probed audio duration (when known and long)."""
        self.ex = ex
        self.path = info.path
        self.has_audio = info.has_audio and info.kind != "image"
        # the audio stream's own duration: a shorter track than the video would otherwise be planned by the video's
        # length and lose the examples past its end; the item's duration only when the audio's is unknown
        dur = float(info.audio_duration if math.isfinite(info.audio_duration) else info.duration)
        self.expected = fe.num_examples(int(dur * fe.SAMPLE_RATE)) if math.isfinite(dur) else None
        wanted = None
        if self.expected is not None and self.expected > ex.spec.max_steps:
            # Long item: compute only the examples we keep (the rest would cost a forward pass each).
            wanted = frozenset(select_examples(self.expected, ex.spec.max_steps).tolist())
        self.planned = wanted is not None
        self.stream = fe.ExampleStream(wanted)
        self.join(ex.example_pool())  # embeddings come back by example index

    def add_audio(self, samples: np.ndarray) -> None:
        """Consume the next 16 kHz mono chunk; queue its completed examples (the pool embeds every full batch)."""
        idx, examples = self.stream.add(np.asarray(samples, dtype=np.float32).reshape(-1))
        if len(idx):
            self.queue([int(i) for i in idx], list(examples))
        self.raise_error()

    def finish(self) -> FeatureRows:
        """OK with (n, 128) values at i·0.96 s; ABSENT no_audio / too_short."""
        spec = self.ex.spec
        if not self.has_audio:
            return FeatureRows.absent(spec, "no_audio", f"vggish: {self.path} has no audio stream")
        emb = self.drain()  # this item's last examples, in one batch with whatever other items have queued
        n = self.stream.examples_seen
        if n == 0:
            got = self.stream.samples_seen
            return FeatureRows.absent(
                spec, "too_short",
                f"vggish: {self.path} has {got} audio samples ({got / fe.SAMPLE_RATE:.4f} s at 16 kHz); one 0.96 s "
                f"example needs {fe.EXAMPLE_SAMPLES} ({fe.EXAMPLE_SAMPLES / fe.SAMPLE_RATE:.4f} s)",
            )
        keep = sorted(emb) if self.planned else select_examples(n, spec.max_steps).tolist()
        values = to_store_dtype(np.stack([emb[i] for i in keep]), spec, f"vggish: {self.path}")
        times = (np.asarray(keep, dtype=np.float64) * fe.EXAMPLE_SECONDS).astype(np.float32)
        return FeatureRows(status=Status.OK, values=values, times=times)
