"""VGGish log-mel front end: the TF AudioSet `mel_features`/`vggish_input` recipe, exactly, plus a streaming framer.

16 kHz mono float audio -> 25 ms periodic-Hann frames (400 samples) every 10 ms (160) -> |rfft| with 512 points ->
64 HTK mel bands 125-7500 Hz (triangles in mel space, DC bin weight 0) -> log(mel + 0.01) -> non-overlapping
96-frame examples (0.96 s each). One example needs 15,600 samples (0.975 s); example i starts at sample i*15,360.
"""
from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # round(16000 * 0.025)
HOP_SAMPLES = 160  # round(16000 * 0.010)
FFT_LENGTH = 512  # 2 ** ceil(log2(400))
NUM_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # round(0.96 s / 10 ms); the example hop equals its length
EXAMPLE_SECONDS = EXAMPLE_FRAMES * HOP_SAMPLES / SAMPLE_RATE  # 0.96
EXAMPLE_HOP_SAMPLES = EXAMPLE_FRAMES * HOP_SAMPLES  # 15,360
EXAMPLE_SAMPLES = WINDOW_SAMPLES + (EXAMPLE_FRAMES - 1) * HOP_SAMPLES  # 15,600: the shortest audio with one example


def periodic_hann(length: int) -> np.ndarray:
    """Periodic ("DFT-even") Hann window of `length` samples, as TF's `periodic_hann`."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi / length * np.arange(length))


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 1127 * ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=4)
def mel_matrix(
    num_bands: int = NUM_BANDS,
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: int = SAMPLE_RATE,
    lower_hz: float = MEL_MIN_HZ,
    upper_hz: float = MEL_MAX_HZ,
) -> np.ndarray:
    """(num_spectrogram_bins, num_bands) float64 triangular weights, built in mel space; read-only."""
    nyquist = sample_rate / 2.0
    if not 0.0 <= lower_hz < upper_hz <= nyquist:
        raise ValueError(f"mel range must satisfy 0 <= {lower_hz} < {upper_hz} <= nyquist {nyquist}")
    bins_mel = hertz_to_mel(np.linspace(0.0, nyquist, num_spectrogram_bins))
    edges = np.linspace(hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_bands + 2)
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lo) / (centre - lo)
    falling = (hi - bins_mel[:, None]) / (hi - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # TF zeroes the DC bin explicitly: with lower_hz == 0 it would otherwise get weight.
    weights[0, :] = 0.0
    weights.setflags(write=False)
    return weights


def _frames(samples: np.ndarray, length: int, hop: int) -> np.ndarray:
    """(n, length) strided view of every full window; n = 1 + (len - length) // hop, or 0."""
    n = 1 + (samples.shape[0] - length) // hop if samples.shape[0] >= length else 0
    if n == 0:
        return np.zeros((0, length), dtype=samples.dtype)
    return np.lib.stride_tricks.as_strided(
        samples, shape=(n, length), strides=(samples.strides[0] * hop, samples.strides[0]), writeable=False
    )


def log_mel(samples: np.ndarray) -> np.ndarray:
    """(F, 64) float64 log-mel frames of 16 kHz mono audio; F = 1 + (len - 400) // 160, or 0 when shorter."""
    x = np.ascontiguousarray(_as_mono_float64(samples))
    frames = _frames(x, WINDOW_SAMPLES, HOP_SAMPLES)
    if frames.shape[0] == 0:
        return np.zeros((0, NUM_BANDS), dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(frames * periodic_hann(WINDOW_SAMPLES), FFT_LENGTH))
    return np.log(spectrum @ mel_matrix() + LOG_OFFSET)


def waveform_to_examples(samples: np.ndarray) -> np.ndarray:
    """(N, 96, 64) float32 log-mel examples; N = 0 for audio shorter than 15,600 samples."""
    mel = log_mel(samples)
    n = mel.shape[0] // EXAMPLE_FRAMES
    return mel[: n * EXAMPLE_FRAMES].reshape(n, EXAMPLE_FRAMES, NUM_BANDS).astype(np.float32)


def num_examples(num_samples: int) -> int:
    """How many examples `num_samples` samples give."""
    if num_samples < EXAMPLE_SAMPLES:
        return 0
    return 1 + (num_samples - EXAMPLE_SAMPLES) // EXAMPLE_HOP_SAMPLES


def _as_mono_float64(samples: np.ndarray) -> np.ndarray:
    """1-D float64 view of a mono chunk; rejects anything else with a clear message."""
    a = np.asarray(samples)
    if a.ndim != 1:
        raise ValueError(f"vggish front end: expected 1-D 16 kHz mono samples, got shape {a.shape}; mix down first")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"vggish front end: expected float samples in [-1, 1], got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


class ExampleStream:
    """Turns in-order audio chunks into log-mel examples, keeping only the samples a future example needs.

    Example i covers samples [i*15360, i*15360 + 15600) of the stream, so each example is computed from exactly
    the samples the one-shot `waveform_to_examples` uses; the results agree with it frame for frame.
    """

    def __init__(self, wanted: frozenset[int] | None = None) -> None:
        """`wanted`: example indices to compute (None = all); others are skipped without computing log-mels."""
        self._buf = np.zeros((0,), dtype=np.float64)
        self._next = 0  # index of the example starting at self._buf[0]
        self._wanted = None if wanted is None else np.array(sorted(wanted), dtype=np.int64)
        self.samples_seen = 0

    @property
    def examples_seen(self) -> int:
        """Examples completed so far (computed or skipped)."""
        return self._next

    def add(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed one chunk; returns (indices (k,) int64, examples (k, 96, 64) float32) completed by it."""
        chunk = _as_mono_float64(samples)
        self.samples_seen += chunk.shape[0]
        buf = np.concatenate([self._buf, chunk]) if self._buf.size else chunk.copy()
        n = num_examples(buf.shape[0])
        idx = np.arange(self._next, self._next + n, dtype=np.int64)
        if self._wanted is not None:
            idx = idx[np.isin(idx, self._wanted)]
        out = np.zeros((idx.shape[0], EXAMPLE_FRAMES, NUM_BANDS), dtype=np.float32)
        for j, i in enumerate(idx):
            start = int(i - self._next) * EXAMPLE_HOP_SAMPLES
            out[j] = log_mel(buf[start : start + EXAMPLE_SAMPLES]).astype(np.float32)
        self._next += n
        self._buf = buf[n * EXAMPLE_HOP_SAMPLES :].copy()
        return idx, out
