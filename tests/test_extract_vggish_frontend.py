"""extract.vggish_frontend: the log-mel front end vs an independent NumPy transcription of the TF formulas,
example boundaries, streaming, input checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from extract import vggish_frontend

SR = 16000


# ---- an independent reference of TF's mel_features / vggish_input (loops, no helpers from extract) ----
def _ref_log_mel_examples(x: np.ndarray) -> np.ndarray:
    """TF AudioSet front end, written from its formulas with explicit loops."""
    win, hop, nfft, bands = 400, 160, 512, 64
    n_frames = 1 + int(math.floor((len(x) - win) / hop)) if len(x) >= win else 0
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * k / win) for k in range(win)])
    nbins = nfft // 2 + 1
    nyq = SR / 2.0
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    bin_mel = [mel(nyq * b / (nbins - 1)) for b in range(nbins)]
    lo_m, hi_m = mel(125.0), mel(7500.0)
    edges = [lo_m + (hi_m - lo_m) * i / (bands + 1) for i in range(bands + 2)]
    w = np.zeros((nbins, bands))
    for i in range(bands):
        lower, centre, upper = edges[i], edges[i + 1], edges[i + 2]
        for b in range(1, nbins):  # DC bin keeps weight 0
            w[b, i] = max(0.0, min((bin_mel[b] - lower) / (centre - lower), (upper - bin_mel[b]) / (upper - centre)))
    out = np.zeros((n_frames, bands))
    for f in range(n_frames):
        seg = np.zeros(nfft)
        seg[:win] = x[f * hop : f * hop + win] * window
        out[f] = np.log(np.abs(np.fft.fft(seg))[:nbins] @ w + 0.01)
    n_ex = n_frames // 96
    return np.stack([out[i * 96 : (i + 1) * 96] for i in range(n_ex)]) if n_ex else np.zeros((0, 96, bands))


def _signals() -> dict[str, np.ndarray]:
    """Sine, seeded noise and a chirp, each a little over 2 examples long."""
    t = np.arange(int(2.2 * SR)) / SR
    rng = np.random.default_rng(0)
    return {
        "sine": 0.5 * np.sin(2 * np.pi * 440.0 * t),
        "noise": 0.3 * rng.standard_normal(t.shape[0]),
        "chirp": 0.4 * np.sin(2 * np.pi * (100.0 * t + 0.5 * (6000.0 / 2.2) * t**2)),
    }


@pytest.mark.parametrize("name", ["sine", "noise", "chirp"])
def test_frontend_matches_independent_tf_reference(name: str) -> None:
    x = _signals()[name].astype(np.float32)
    ref = _ref_log_mel_examples(x.astype(np.float64))
    got = vggish_frontend.waveform_to_examples(x)
    assert ref.shape == (2, 96, 64) and got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_frontend_example_boundary_and_mel_matrix() -> None:
    assert vggish_frontend.EXAMPLE_SAMPLES == 15600 and vggish_frontend.EXAMPLE_HOP_SAMPLES == 15360
    noise = np.random.default_rng(1).standard_normal(15600).astype(np.float32)
    assert vggish_frontend.waveform_to_examples(noise).shape == (1, 96, 64)
    assert vggish_frontend.waveform_to_examples(noise[:15599]).shape == (0, 96, 64)
    assert [vggish_frontend.num_examples(n) for n in (15599, 15600, 30959, 30960)] == [0, 1, 1, 2]
    w = vggish_frontend.mel_matrix()
    assert w.shape == (257, 64) and np.all(w[0] == 0) and np.all(w >= 0) and w.max() <= 1.0
    # bins above 7500 Hz (bin 240 = 7500 Hz) get no weight; each band has a non-empty support
    assert np.all(w[241:] == 0) and np.all(w.sum(axis=0) > 0)


def test_stream_equals_one_shot_and_keeps_only_remainder() -> None:
    x = _signals()["chirp"].astype(np.float32)
    x = np.concatenate([x, x])  # 4.4 s -> 4 examples
    whole = vggish_frontend.waveform_to_examples(x)
    stream = vggish_frontend.ExampleStream()
    got_idx, got = [], []
    for chunk in np.array_split(x, 13):  # uneven chunks that straddle example boundaries
        idx, ex = stream.add(chunk)
        got_idx.append(idx)
        got.append(ex)
        assert stream._buf.shape[0] < vggish_frontend.EXAMPLE_SAMPLES + chunk.shape[0]
    np.testing.assert_array_equal(np.concatenate(got_idx), np.arange(whole.shape[0]))
    np.testing.assert_allclose(np.concatenate(got), whole, atol=1e-6, rtol=0)
    # a `wanted` subset computes only those examples, with identical values
    sub = vggish_frontend.ExampleStream(wanted=frozenset({1, 3}))
    parts = [sub.add(c) for c in np.array_split(x, 5)]
    idx = np.concatenate([p[0] for p in parts])
    np.testing.assert_array_equal(idx, [1, 3])
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), whole[[1, 3]], atol=1e-6, rtol=0)
    assert sub.examples_seen == 4


def test_frontend_rejects_stereo_and_int() -> None:
    with pytest.raises(ValueError, match="mono"):
        vggish_frontend.waveform_to_examples(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="float"):
        vggish_frontend.waveform_to_examples(np.zeros(16000, np.int16))
