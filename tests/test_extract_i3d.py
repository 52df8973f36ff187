"""I3D extractors: stack planning and streaming, flow crop from unpadded RAFT flow, weights, end to end."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.optical_flow import raft_small

from extract import create_extractor, list_extractors
from extract.i3d import I3D_WEIGHTS, I3DFlow, I3DRgb, plan_stacks, resized_size
from extract.i3d_net import I3DCheckpointError, InceptionI3d, export_state_dict
from extract.raft_flow import RAFT_WEIGHTS
from store.schema import Status
from tests._extractors import oom_above
from tests._fakes import FakeWeightsFactory
from tests._media import TinyVideoFactory, write_image

FAST_FLOW = dict(random_init=True, raft="raft_small.C_T_V2", num_flow_updates=2, device="cpu")


@dataclass
class Batch:
    """The fields of extract.decode.FrameBatch a session reads."""

    frames: np.ndarray
    times: np.ndarray
    index: np.ndarray


@dataclass
class Info:
    """The fields of extract.decode.MediaInfo a session reads."""

    path: str = "synthetic.mp4"
    kind: str = "video"
    duration: float = float("nan")


def _video(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Seeded smooth moving pattern, uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3)).astype(np.float32)
    big = np.kron(base, np.ones((4, 4, 1), np.float32))
    return np.stack([np.roll(big, (k, 2 * k), axis=(0, 1))[:h, :w] for k in range(n)]).astype(np.uint8)


def _run(ex: I3DFlow | I3DRgb, frames: np.ndarray, chunk: int = 7, info: Info | None = None):
    """Stream `frames` through a session in chunks of `chunk` and finish it."""
    info = info or Info(duration=len(frames) / 25)
    session = ex.start(info)
    for a in range(0, len(frames), chunk):
        idx = np.arange(a, min(a + chunk, len(frames)))
        session.add_frames(Batch(frames[idx], idx / 25.0, idx))
    return session.finish()


def _constant_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frame k is the constant colour k (so a stack's content names its frames)."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, h, w, 3)).copy()


def _fake_i3d(ex: I3DRgb | I3DFlow, seen: list[torch.Tensor]) -> None:
    """Replace the I3D forward by one that records stacks and returns their frame labels (row 0 of each item)."""

    def run(stacks: list[torch.Tensor]) -> np.ndarray:
        seen.extend(stacks)
        out = np.zeros((len(stacks), 1024), np.float32)
        for i, st in enumerate(stacks):
            out[i, : st.shape[1]] = st[0, :, 0, 0].numpy()
        return out

    ex.run_stacks = run  # type: ignore[method-assign]


# ---- planning --------------------------------------------------------------------------------------------------


def test_plan_stacks_needs_stack_plus_one_frames_and_spreads_beyond_max() -> None:
    assert plan_stacks(64, 64, 64, 10).tolist() == []
    assert plan_stacks(65, 64, 64, 10).tolist() == [0]
    assert plan_stacks(192, 64, 64, 10).tolist() == [0, 64]
    assert plan_stacks(193, 64, 64, 10).tolist() == [0, 64, 128]
    assert plan_stacks(49, 24, 24, 10).tolist() == [0, 24]
    assert plan_stacks(100, 10, 5, 100).tolist() == list(range(0, 90, 5))
    spread = plan_stacks(1001, 64, 64, 5)
    assert spread.tolist() == [0, 234, 468, 702, 936]  # uniform over the valid starts 0..936


def test_resized_size_matches_the_reference_truncation() -> None:
    assert resized_size(48, 64) == (256, 341)
    assert resized_size(360, 240) == (384, 256)
    assert resized_size(256, 500) == (256, 500)
    assert resized_size(100, 100) == (256, 256)


# ---- streaming logic (real preprocessing, fake I3D) -----------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_rgb_stacks_hold_exactly_their_frames(chunk: int) -> None:
    ex = I3DRgb(random_init=True, stack_size=10, step_size=6, device="cpu")
    seen: list[torch.Tensor] = []
    _fake_i3d(ex, seen)
    row = _run(ex, _constant_frames(30), chunk=chunk)
    assert row.status == Status.OK
    starts = [0, 6, 12, 18]  # 18 + 10 = 28 <= 29; 24 + 10 > 29
    np.testing.assert_allclose(row.times, np.array(starts) / 25)
    for s, values in zip(starts, row.values.astype(np.float32)):
        np.testing.assert_allclose(values[:10], (2 * np.arange(s, s + 10) / 255 - 1), atol=1e-3)  # float16 store
    assert all(st.shape == (3, 10, 224, 224) for st in seen)


def test_step_larger_than_stack_skips_frames_and_keeps_memory_small() -> None:
    ex = I3DRgb(random_init=True, stack_size=10, step_size=25, device="cpu")
    seen: list[torch.Tensor] = []
    _fake_i3d(ex, seen)
    session = ex.start(Info(duration=3.0))
    frames = _constant_frames(75)
    peak = 0
    for k in range(75):
        session.add_frames(Batch(frames[k : k + 1], np.array([k / 25]), np.array([k])))
        peak = max(peak, len(session.frames))
    row = session.finish()
    np.testing.assert_allclose(row.times, [0.0, 1.0, 2.0])
    assert peak <= 11  # never more than one stack (+1) of resized frames


def test_more_stacks_than_max_steps_are_spread_uniformly() -> None:
    ex = I3DRgb(random_init=True, stack_size=10, step_size=10, max_steps=3, device="cpu")
    seen: list[torch.Tensor] = []
    _fake_i3d(ex, seen)
    row = _run(ex, _constant_frames(101))
    assert row.values.shape == (3, 1024)
    np.testing.assert_allclose(row.times, np.array([0, 45, 90]) / 25)  # valid starts 0..90
    assert len(seen) == 3  # only the kept stacks were computed
    # duration unknown: every grid stack is computed, then a uniform subset is kept
    seen.clear()
    row = _run(ex, _constant_frames(101), info=Info(duration=float("nan")))
    np.testing.assert_allclose(row.times, np.array([0, 40, 90]) / 25)
    assert len(seen) == 10


def test_flow_crop_is_the_centre_of_unpadded_flow() -> None:
    ex = I3DFlow(stack_size=9, step_size=9, **FAST_FLOW)

    class KnownField(torch.nn.Module):
        """Flow = padded pixel coordinates / 100 (px), so the crop position is readable from the values."""

        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def forward(self, a: torch.Tensor, b: torch.Tensor, num_flow_updates: int = 12) -> list[torch.Tensor]:
            self.shapes.append(tuple(a.shape))
            n, _, h, w = a.shape
            ys, xs = torch.meshgrid(torch.arange(h) / 100.0, torch.arange(w) / 100.0, indexing="ij")
            return [torch.stack([xs, ys]).expand(n, 2, h, w).clone()]

    stub = KnownField()
    ex.flow.model = stub
    crops: list[torch.Tensor] = []
    original = ex.flow.__class__.__call__

    def spy(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        out = original(self, first, second)
        crops.append(out)
        return out

    seen: list[torch.Tensor] = []
    _fake_i3d(ex, seen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(ex.flow), "__call__", spy)
        row = _run(ex, _video(10))
    assert row.status == Status.OK and len(seen) == 1
    assert all(s[-2:] == (256, 344) for s in stub.shapes)  # 341 wide frames padded to 344 (1 left, 2 right)
    assert all(tuple(c.shape[-2:]) == (256, 341) for c in crops)  # flow handed to the crop is unpadded
    stack = seen[0]  # (2, 9, 224, 224), scaled by 1/20
    rows, cols = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    expected_x = (cols + 58 + 1) / 100 / 20  # crop left = (341-224)//2 = 58, +1 px left padding removed
    expected_y = (rows + 16) / 100 / 20  # crop top = (256-224)//2 = 16, no vertical padding
    for t in range(9):
        torch.testing.assert_close(stack[0, t], expected_x)
        torch.testing.assert_close(stack[1, t], expected_y)


# ---- absent rows -----------------------------------------------------------------------------------------------


def test_image_and_too_short_video_are_absent() -> None:
    flow = I3DFlow(stack_size=10, step_size=10, **FAST_FLOW)
    rgb = I3DRgb(random_init=True, stack_size=10, step_size=10, device="cpu")
    image = Info(kind="image", duration=0.0)
    frame = _video(1)
    for ex, reason in ((flow, "no_motion"), (rgb, "too_short")):
        row = _run(ex, frame, info=image)
        assert (row.status, row.reason, row.values.shape) == (Status.ABSENT, reason, (0, 1024))
        row = _run(ex, _video(10))  # one frame short of a 10-frame stack
        assert (row.status, row.reason) == (Status.ABSENT, "too_short")
        assert "11" in row.message
        row = _run(ex, _video(1)[:0], info=Info(duration=1.0))
        assert (row.status, row.reason) == (Status.ABSENT, "no_video")


def test_too_short_video_runs_no_flow_and_long_video_streams_it() -> None:
    flow = I3DFlow(stack_size=10, step_size=10, raft_batch_size=2, **FAST_FLOW)
    pairs: list[int] = []
    real = flow.flow

    def counting(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        pairs.append(first.shape[0])
        return real(first, second)

    flow.flow = counting
    assert _run(flow, _video(10)).reason == "too_short"
    assert pairs == []  # no stack can complete, so no RAFT pair was computed
    row = _run(flow, _video(31))  # stacks at 0, 10, 20: every pair of every stack is computed, none twice
    assert row.status == Status.OK and len(row.values) == 3 and sum(pairs) == 30


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="stack_size must be >= 9"):
        I3DRgb(random_init=True, stack_size=8)
    with pytest.raises(ValueError, match="unknown source"):
        I3DRgb(random_init=True, source="nope")
    with pytest.raises(TypeError, match="unknown options"):
        I3DRgb(random_init=True, bogus=1)


# ---- real networks, random weights -----------------------------------------------------------------------------


def test_registered_and_rgb_end_to_end() -> None:
    assert {"i3d_flow", "i3d_rgb"} <= set(list_extractors())
    ex = create_extractor("i3d_rgb", random_init=True, seed=1, stack_size=9, step_size=9, device="cpu")
    assert ex.spec.dim == 1024 and ex.spec.name == "i3d_rgb"
    row = _run(ex, _video(19))
    assert row.status == Status.OK and row.values.shape == (2, 1024) and row.values.dtype == np.float16
    np.testing.assert_allclose(row.times, [0.0, 0.36])
    assert np.isfinite(row.values.astype(np.float32)).all() and np.abs(row.values).sum() > 0


def test_flow_end_to_end_shapes_times_and_determinism() -> None:
    frames = _video(21, 48, 48)  # square: RAFT runs at 256x256
    a = create_extractor("i3d_flow", stack_size=10, step_size=10, seed=2, **FAST_FLOW)
    b = create_extractor("i3d_flow", stack_size=10, step_size=10, seed=2, **FAST_FLOW)
    ra, rb = _run(a, frames, chunk=21), _run(b, frames, chunk=4)
    assert ra.status == Status.OK and ra.values.shape == (2, 1024)
    np.testing.assert_allclose(ra.times, [0.0, 0.4])
    np.testing.assert_array_equal(ra.values, rb.values)  # same seed, different decode chunking: same bytes
    assert not np.array_equal(ra.values[0], ra.values[1])
    prov = a.provenance()
    assert prov["weights"] == {"random": True, "seed": 2}
    assert prov["options"]["flow"]["weights"] == {"random": True, "seed": 2}
    assert prov["options"]["flow"]["num_flow_updates"] == 2


def test_flow_with_default_raft_large() -> None:
    ex = create_extractor("i3d_flow", random_init=True, stack_size=9, step_size=9, num_flow_updates=1,
                          quantize_uint8=True, device="cpu")
    assert ex.flow.arch == "raft_large" and ex.flow.num_flow_updates == 1
    row = _run(ex, _video(10, 48, 48))
    assert row.status == Status.OK and row.values.shape == (1, 1024)
    assert ex.provenance()["options"]["flow_scaling"].startswith("uint8")


def test_defaults_are_the_reference_recipe() -> None:
    ex = create_extractor("i3d_flow", random_init=True, device="cpu")
    assert (ex.stack_size, ex.step_size, ex.max_steps) == (64, 64, 64)
    assert ex.flow.spec.name == "raft_large.C_T_SKHT_V1" and ex.flow.num_flow_updates == 20
    assert ex.quantize_uint8 is False and ex.spec.modality == "motion" and ex.model.in_channels == 2
    flow = ex.provenance()["options"]["flow"]
    assert flow["variant"] == "raft_large.C_T_SKHT_V1" and "removed before cropping" in flow["padding"]
    rgb = create_extractor("i3d_rgb", random_init=True, device="cpu")
    assert rgb.model.in_channels == 3 and rgb.spec.modality == "appearance" and rgb.stack_size == 64


# ---- weights files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hassony2", "piergiaj"])
def test_real_layout_checkpoints_load_into_the_extractor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, fake_weights: FakeWeightsFactory
) -> None:
    torch.manual_seed(5)
    reference = InceptionI3d(2, 400).eval()
    spec = I3D_WEIGHTS["video_features.flow"]
    i3d_digest = fake_weights(export_state_dict(reference, layout), spec.filename).sha256
    raft_spec = RAFT_WEIGHTS["raft_small.C_T_V2"]
    digest = fake_weights(raft_small(weights=None), raft_spec.filename).sha256
    monkeypatch.setitem(RAFT_WEIGHTS, raft_spec.name, dataclasses.replace(raft_spec, sha256=digest))
    ex = I3DFlow(weights_dir=tmp_path, raft=raft_spec.name, num_flow_updates=1, stack_size=9, device="cpu")
    for name, value in ex.model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=0, atol=0)
    prov = ex.provenance()
    assert prov["weights"] == {"file": "i3d_flow.pt", "sha256": i3d_digest}
    assert prov["options"]["checkpoint_layout"] == layout
    assert prov["options"]["flow"]["weights"] == {"file": raft_spec.filename, "sha256": digest}
    rgb_file = tmp_path / "rgb.pt"
    torch.save(export_state_dict(InceptionI3d(3, 400), layout), rgb_file)
    with pytest.raises(I3DCheckpointError, match="RGB-input model.*flow"):
        I3DFlow(weights_path=rgb_file, raft=raft_spec.name, weights_dir=tmp_path, device="cpu")


@pytest.mark.slow
def test_video_features_compat_is_selectable_recorded_and_never_mixed(tmp_path: Path) -> None:
    from extract.i3d_net import load_i3d_checkpoint
    from store.schema import ItemRecord, StoreError
    from store.zarr_store import FeatureStore

    torch.manual_seed(6)
    src = InceptionI3d(3, 400)
    for m in src.modules():  # small BatchNorm variances, as in the real files, so eps matters
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_var.uniform_(1e-4, 3e-3)
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data.mul_(0.05)
    spec = I3D_WEIGHTS["video_features.rgb"]
    torch.save(export_state_dict(src, "hassony2"), tmp_path / spec.filename)  # video_features' i3d_rgb.pt layout
    opts = dict(weights_dir=tmp_path, stack_size=10, step_size=10, device="cpu")
    vf, tf = I3DRgb(compat="video_features", **opts), I3DRgb(**opts)
    stacks: list[torch.Tensor] = []
    run = vf.run_stacks
    vf.run_stacks = lambda st: (stacks.extend(st), run(st))[1]  # type: ignore[method-assign]
    frames = _video(11, 48, 64)  # 10-frame stacks: odd length (5) at MaxPool3d_4a, where the paddings differ
    rv, rt = _run(vf, frames), _run(tf, frames)
    assert rv.values.shape == rt.values.shape == (1, 1024) and len(stacks) == 1
    ref, _ = load_i3d_checkpoint(tmp_path / spec.filename, in_channels=3, compat="video_features")
    with torch.no_grad():
        expected = ref.eval().features(stacks[0][None]).numpy().astype(np.float16)
    np.testing.assert_array_equal(rv.values, expected)
    assert np.abs(rv.values.astype(np.float32) - rt.values.astype(np.float32)).max() > 1e-2
    pv, pt = vf.provenance(), tf.provenance()
    assert (pv["options"]["compat"], pv["options"]["bn_eps"]) == ("video_features", 1e-5)
    assert (pt["options"]["compat"], pt["options"]["bn_eps"]) == ("tf", 1e-3)
    assert "static" in pv["options"]["padding"] and "tf_same" in pt["options"]["padding"]
    assert pt["variant"] == "video_features.rgb" and pv["variant"] == "video_features.rgb+compat=video_features"
    assert pv["weights"] == pt["weights"]  # same file; the variant keeps the groups apart
    store = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord(id="a", path="a.mp4")])
    store.ensure_feature(tf.spec, pt)
    with pytest.raises(StoreError, match="variant"):
        store.ensure_feature(vf.spec, pv)
    with pytest.raises(ValueError, match="stack_size must be >= 10"):
        I3DRgb(random_init=True, compat="video_features", stack_size=9)
    with pytest.raises(ValueError, match="compat must be one of"):
        I3DRgb(random_init=True, compat="caffe")


# ---- through the decoder -----------------------------------------------------------------------------------


def test_extract_path_on_a_lossless_video_equals_streaming_the_frames(tmp_path: Path,
                                                                      tiny_video: TinyVideoFactory) -> None:
    clip = tiny_video(_video(19, 48, 48), name="clip.mkv")  # square: RAFT runs at 256x256, the cheapest it accepts
    frames = clip.frames
    ex = create_extractor("i3d_flow", stack_size=9, step_size=9, **FAST_FLOW)
    row = ex.extract_path(clip.path)
    assert row.status == Status.OK and row.values.shape == (2, 1024)
    np.testing.assert_allclose(row.times, [0.0, 0.36])
    np.testing.assert_array_equal(row.values, _run(ex, frames).values)
    row = ex.extract_path(tiny_video(frames[:9], name="short.mkv").path)
    assert (row.status, row.reason) == (Status.ABSENT, "too_short") and "10 (0.40 s)" in row.message
    image = tmp_path / "still.png"
    write_image(image, frames[0])
    row = ex.extract_path(image)
    assert (row.status, row.reason, row.values.shape) == (Status.ABSENT, "no_motion", (0, 1024))


def test_rgb_extract_path_on_a_lossless_video(tmp_path: Path, tiny_video: TinyVideoFactory) -> None:
    clip = tiny_video(_video(21), name="clip.mkv")
    frames = clip.frames
    ex = create_extractor("i3d_rgb", random_init=True, seed=3, stack_size=10, step_size=10, device="cpu")
    row = ex.extract_path(clip.path)
    assert row.status == Status.OK and row.values.shape == (2, 1024) and row.values.dtype == np.float16
    np.testing.assert_allclose(row.times, [0.0, 0.4])
    np.testing.assert_array_equal(row.values, _run(ex, frames).values)  # lossless: decoded = written frames
    image = tmp_path / "still.png"
    write_image(image, frames[0])
    assert ex.extract_path(image).reason == "too_short"


def test_i3d_cuda_oom_halves_stack_and_pair_batches() -> None:
    rows, exs = [], []
    for limit in (None, 1):
        ex = I3DRgb(random_init=True, stack_size=10, step_size=6, stack_batch=4, device="cpu")
        _fake_i3d(ex, [])
        stacks: list[int] = []
        pairs: list[int] = []
        if limit is not None:
            ex.run_stacks = oom_above(limit, ex.run_stacks, stacks)  # type: ignore[method-assign]
            ex.make_items = oom_above(4, ex.make_items, pairs)  # type: ignore[method-assign]
        rows.append(_run(ex, _constant_frames(40), chunk=40))
        exs.append((ex, stacks, pairs))
    np.testing.assert_array_equal(rows[1].values, rows[0].values)  # same features as without the OOM
    np.testing.assert_array_equal(rows[1].times, rows[0].times)
    ex, stacks, pairs = exs[1]
    assert stacks[:3] == [4, 2, 1] and ex.stack_batch == 1  # 4 stacks -> 2 -> 1 (fits); later runs start at 1
    assert max(pairs) > 4 and ex.pair_batch <= 4 and pairs[-1] <= 4  # the frames' inputs are halved too
    flow = I3DFlow(**FAST_FLOW, stack_size=10, step_size=10)
    flow.lower_pair_batch(3)
    assert flow.pair_batch == 3 and flow.flow.batch_size == 3  # RAFT's own forward batch follows
    one = I3DRgb(random_init=True, stack_size=10, step_size=6, device="cpu")
    _fake_i3d(one, [])
    one.run_stacks = oom_above(0, one.run_stacks, [])  # type: ignore[method-assign]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a single stack that does not fit is a real failure
        _run(one, _constant_frames(12), chunk=12)


@pytest.mark.gpu
def test_cuda_agrees_with_cpu() -> None:
    frames = _video(11)
    rows = []
    for device in ("cpu", "cuda", "cuda"):
        ex = create_extractor("i3d_flow", stack_size=10, step_size=10, **{**FAST_FLOW, "device": device})
        rows.append(_run(ex, frames).values.astype(np.float32))
    cpu, gpu, again = rows
    cos = (cpu * gpu).sum() / np.linalg.norm(cpu) / np.linalg.norm(gpu)
    assert cos > 0.999  # TF32 convolutions on CUDA differ slightly from CPU
    np.testing.assert_allclose(gpu, again, rtol=1e-5, atol=1e-5)


def test_features_that_overflow_float16_are_an_error_not_inf() -> None:
    ex = I3DRgb(random_init=True, stack_size=9, step_size=9, device="cpu")
    ex.run_stacks = lambda stacks: np.full((len(stacks), 1024), 1e6, np.float32)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="overflow float16"):
        _run(ex, _constant_frames(10))
    ex.run_stacks = lambda stacks: np.full((len(stacks), 1024), np.nan, np.float32)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="NaN"):
        _run(ex, _constant_frames(10))
