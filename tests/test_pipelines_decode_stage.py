"""The decode stage: CPU decode actors streaming batches to the model workers give the same store as in-worker decode."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from extract import engine
from store.schema import Status
from pipelines.decode_stage import DecodeWorker, decode_actor_cpus, max_in_flight
from tests._media import write_video
from tests._pipelines import PLUGIN, make_dataset, open_store, run_extract, status_by_id, worker_store


def test_in_flight_objects_follow_the_byte_budget() -> None:
    info = SimpleNamespace(width=640, height=360)
    opts = engine.DecodeOptions(batch_size=16)
    per_batch = 640 * 360 * 3 * 16
    assert max_in_flight(info, opts, budget=10 * per_batch) == 10
    assert max_in_flight(info, opts, budget=1) == 2  # never below 2 (one being read, one being made)
    small = engine.DecodeOptions(batch_size=16, height=180)  # --decode-height halves both sides
    assert max_in_flight(info, small, budget=10 * per_batch) == 40


def test_decode_actor_cpus_fit_half_the_cluster() -> None:
    assert decode_actor_cpus(0, 16) == 0.0
    assert decode_actor_cpus(4, 16) == 1.0
    assert decode_actor_cpus(4, 2) == 0.25 and decode_actor_cpus(2, 2) == 0.5


def test_decode_worker_streams_what_the_engine_decodes(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (20, 8, 12, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mkv", frames, audio=np.sin(np.arange(8000) * 0.05) * 0.5)
    plan = engine.StreamPlan(True, True, frozenset({0, 10}))
    opts = engine.DecodeOptions(batch_size=4)
    got = list(DecodeWorker().stream(str(tmp_path / "v.mkv"), plan, opts))
    want = list(engine.decode_streams(str(tmp_path / "v.mkv"), plan, opts))
    assert [k for k, _ in got] == [k for k, _ in want] == ["frames", "audio"]
    np.testing.assert_array_equal(got[0][1].index, [0, 10, 19])
    np.testing.assert_array_equal(got[0][1].frames, want[0][1].frames)


@pytest.mark.slow
def test_decode_workers_give_the_same_store_as_in_worker_decoding(ray_session: None, tmp_path: Path) -> None:
    man, _ = make_dataset(tmp_path)
    feats = "test_mean,test_max,test_rms"
    assert run_extract(man, tmp_path / "inline.zarr", features=feats) == 1  # the dataset has bad files: exit 1
    assert run_extract(man, tmp_path / "stage.zarr", "--decode-workers", "2", "--batch-size", "3", features=feats) == 1
    a, b = open_store(tmp_path / "inline.zarr"), open_store(tmp_path / "stage.zarr")
    for f in feats.split(","):
        assert status_by_id(a, f) == status_by_id(b, f), f  # statuses and reasons per item (bad files, stream errors)
        ra, rb = a.read(f), b.read(f)
        np.testing.assert_array_equal(ra.values, rb.values)
        np.testing.assert_array_equal(ra.mask, rb.mask)


@pytest.mark.slow
def test_items_in_flight_give_the_same_store(ray_session: None, tmp_path: Path) -> None:
    man, _ = make_dataset(tmp_path)
    feats = "test_mean,test_max,test_rms,test_caption"
    assert run_extract(man, tmp_path / "one.zarr", features=feats) == 1
    runs = {"threads": ("--items-in-flight", "4"), "inline": ("--items-in-flight", "3", "--decode-queue", "0"),
            "stage": ("--items-in-flight", "3", "--decode-workers", "2", "--batch-size", "3")}
    a = open_store(tmp_path / "one.zarr")
    for name, extra in runs.items():
        assert run_extract(man, tmp_path / f"{name}.zarr", *extra, features=feats) == 1, name
        b = open_store(tmp_path / f"{name}.zarr")
        for f in feats.split(","):
            assert status_by_id(a, f) == status_by_id(b, f), (name, f)  # bad files, stream errors: per item
            ra, rb = a.read(f), b.read(f)
            np.testing.assert_array_equal(ra.values, rb.values)
            np.testing.assert_array_equal(ra.mask, rb.mask)


@pytest.mark.slow
def test_model_worker_reads_its_items_from_decode_actors_only(ray_session: None, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from extract import decode
    from pipelines.worker import ExtractWorker

    rng = np.random.default_rng(4)
    clips = {k: rng.integers(0, 256, (9 + i, 8, 8, 3), dtype=np.uint8) for i, k in enumerate("abc")}
    for k, f in clips.items():
        write_video(tmp_path / f"{k}.mkv", f, audio=np.sin(np.arange(4000) * 0.1) * 0.3)
    decoders = [ray.remote(DecodeWorker).options(num_cpus=0.1, max_concurrency=2).remote() for _ in range(2)]
    feats = ["test_mean", "test_rms"]
    w = ExtractWorker(feats, plugins=[PLUGIN], extractor_kwargs={"random_init": True}, batch_size=2,
                      decoders=decoders)
    paths = {k: tmp_path / f"{k}.mkv" for k in clips}
    url = worker_store(tmp_path, w, paths)

    def no_local_decode(*a: object, **k: object) -> None:
        raise AssertionError("the model worker decoded locally")

    monkeypatch.setattr(decode, "iter_frames", no_local_decode)  # this process only; the actors are untouched
    monkeypatch.setattr(decode, "iter_audio", no_local_decode)
    hints = [(str(paths["b"]), feats), (str(paths["c"]), feats)]
    results = [w.process(url, 0, str(paths["a"]), feats, prefetch=hints),  # b and c start decoding now
               w.process(url, 1, str(paths["b"]), feats, prefetch=hints[1:]),
               w.process(url, 2, str(paths["c"]), feats)]
    ok = (int(Status.OK), "")
    assert [r["results"] for r in results] == [{"test_mean": ok, "test_rms": ok}] * 3, results
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    vals = fs.read("test_mean").values
    for r, (k, f) in enumerate(clips.items()):
        np.testing.assert_allclose(vals[r, : len(f)], f.reshape(len(f), -1, 3).astype(np.float64).mean(1) / 255,
                                   atol=1e-6)
    assert fs.read("test_rms").mask.any(axis=1).all()


def test_a_decode_worker_loads_the_decoder_when_it_starts_not_in_its_first_stream() -> None:
    import subprocess
    import sys

    code = ("import sys; from pipelines.decode_stage import DecodeWorker; "
            "assert 'extract.decode' not in sys.modules, 'imported too early to test'; "
            "DecodeWorker(); assert 'av' in sys.modules and 'extract.decode' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parents[1]))
