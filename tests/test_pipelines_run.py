"""End to end with real Ray: store contents, statuses and reasons, resume, retries of dead workers, inputs, exit codes.

One local Ray session (2 CPUs) is shared by the module; the pipeline reuses it. Extractors are the cheap
deterministic ones in tests/pipelines_testext.py, loaded in the driver and every worker with --plugins.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from store.schema import Status
from tests._media import write_image, write_video
from tests._pipelines import PLUGIN, make_dataset, open_store, proc_table, run_extract, status_by_id

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
OK, ABSENT, FAILED, PENDING = int(Status.OK), int(Status.ABSENT), int(Status.FAILED), int(Status.PENDING)


def test_store_contents_statuses_reasons_and_resume(ray_session: None, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    man, expect = make_dataset(tmp_path)
    store = tmp_path / "s.zarr"
    assert run_extract(man, store) == 1  # bad files FAILED -> exit 1
    out = capsys.readouterr().out
    assert "test_mean" in out and "decode_error" in out and "missing_file" in out
    fs = open_store(store)
    mean, rms = status_by_id(fs, "test_mean"), status_by_id(fs, "test_rms")
    for i in ("v0", "v1", "v2", "v3", "img0", "img1"):
        assert mean[i][0] == OK, (i, mean[i])
    assert rms["v0"][0] == OK and rms["v2"][0] == OK
    assert rms["v1"] == (ABSENT, "no_audio") and rms["img0"] == (ABSENT, "no_audio")
    assert mean["boom"] == (FAILED, "extractor_error") and rms["boom"] == (ABSENT, "no_audio")
    for bad in ("corrupt", "zero"):
        assert mean[bad] == (FAILED, "decode_error") and rms[bad] == (FAILED, "decode_error")
    assert mean["truncated"][0] == FAILED and mean["truncated"][1] in ("truncated", "decode_error"), mean["truncated"]
    assert mean["missing"] == (FAILED, "missing_file") and rms["missing"] == (FAILED, "missing_file")
    # values: exact per-frame mean colours of the lossless inputs, masks and times per step
    batch = fs.read("test_mean")
    rows = {str(i): r for r, i in enumerate(fs.items().id)}
    for item, frames in expect.items():
        r = rows[item]
        want = frames.reshape(len(frames), -1, 3).astype(np.float64).mean(axis=1) / 255.0
        np.testing.assert_allclose(batch.values[r, : len(frames)], want, rtol=0, atol=1e-6)
        assert batch.mask[r].sum() == len(frames)
    caps = status_by_id(fs, "test_caption")
    assert set(s for s, _ in caps.values()) == {OK} and len(caps) == 4 * 2 + 2 + 1
    cbatch = fs.read("test_caption")
    texts = [str(t) for t in fs.captions().text]
    np.testing.assert_array_equal(cbatch.values[:, 0, 0], [len(t) for t in texts])
    before = {f: fs.read(f).values.copy() for f in ("test_mean", "test_rms")}

    # resume: nothing left to do without --retry-failed; FAILED rows redone (and FAILED again) with it
    assert run_extract(man, store) == 1
    assert "0 task(s)" in capsys.readouterr().out
    assert run_extract(man, store, "--retry-failed") == 1
    assert "4 task(s)" in capsys.readouterr().out  # boom, corrupt, zero, truncated (missing: no task)
    fs = open_store(store)
    for f, v in before.items():
        np.testing.assert_array_equal(fs.read(f).values, v)


def test_added_feature_fills_only_that_feature_and_folder_input(ray_session: None, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    man, _ = make_dataset(tmp_path, n_good=2)
    for bad in ("boom.mkv", "corrupt.mp4", "zero.mp4", "truncated.mkv"):
        (tmp_path / "media" / bad).unlink()
    store = tmp_path / "f.zarr"
    assert run_extract(tmp_path / "media", store, features="test_mean") == 0
    capsys.readouterr()
    fs = open_store(store)
    assert sorted(str(i) for i in fs.items().id) == ["img0.png", "img1.png", "v0.mkv", "v1.mkv"]
    first = fs.read("test_mean").values.copy()
    assert run_extract(tmp_path / "media", store, features="test_mean,test_rms") == 0
    assert "4 task(s)" in capsys.readouterr().out
    fs = open_store(store)
    np.testing.assert_array_equal(fs.read("test_mean").values, first)
    assert fs.coverage()["test_rms"] == {"ok": 1, "absent": 3, "failed": 0, "pending": 0}


def test_csv_manifest_captions(ray_session: None, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    write_image(tmp_path / "m" / "a.png", np.full((4, 4, 3), 7, np.uint8))
    write_video(tmp_path / "m" / "b.mkv", np.full((3, 4, 4, 3), 9, np.uint8))
    man = tmp_path / "m.csv"
    man.write_text("id,path,caption\na,m/a.png,first\nb,m/b.mkv,second\na,m/a.png,third\n")
    store = tmp_path / "c.zarr"
    assert run_extract(man, store, "--workers", "3") == 0  # 3 actors on 2 CPUs (fractional): all start, no deadlock
    fs = open_store(store)
    assert [str(c) for c in fs.captions().text] == ["first", "third", "second"]
    assert fs.coverage()["test_caption"]["ok"] == 3
    assert float(fs.read("test_mean").values[0, 0, 0]) == pytest.approx(7 / 255)


def test_reruns_refuse_other_decode_settings_and_changed_manifests(ray_session: None, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "media").mkdir()
    clips = {k: rng.integers(0, 256, (6 + i, 16, 24, 3), dtype=np.uint8) for i, k in enumerate("ab")}
    for k, frames in clips.items():
        write_video(tmp_path / "media" / f"{k}.mkv", frames)
    rows = [{"id": "a", "path": "media/a.mkv", "captions": ["one"]}, {"id": "b", "path": "media/b.mkv"}]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store, same = tmp_path / "s.zarr", ("--decode-height", "8", "--frame-rule", "floor")
    assert run_extract(man, store, *same) == 0
    fs = open_store(store)
    assert fs.provenance("test_mean")["decode"] == {"fps": 25.0, "height": 8, "frame_rule": "floor"}
    assert "decode" not in fs.provenance("test_rms")  # audio values do not depend on frame decoding
    capsys.readouterr()
    assert run_extract(man, store) == 2  # native height, nearest frame rule: refused, nothing mixed
    err = capsys.readouterr().err
    assert "decode.height: stored 8, this run null" in err and '"floor", this run "nearest"' in err
    assert "--decode-height 8" in err and "--frame-rule floor" in err
    with monkeypatch.context() as m:  # a concurrent driver created the store after this one looked: still refused
        m.setattr("pipelines.run._existing_store", lambda cfg, ds, err: None)
        assert run_extract(man, store) == 2
    assert "decode.height: stored 8, this run null" in capsys.readouterr().err
    rows[0] = {"id": "a", "path": "media/b.mkv", "captions": ["uno"]}  # a now names b's file, and a new caption
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_extract(man, store, *same) == 2
    err = capsys.readouterr().err
    assert "changed 2 entries" in err and "caption 'a#0': text 'one' -> 'uno'" in err and "b.mkv'" in err
    assert open_store(store).status("test_mean").tolist() == [OK, OK]  # refused before anything was written
    assert run_extract(man, store, *same, "--update-manifest") == 0
    assert "1 item row(s) and the chunks holding 1 caption row(s) are PENDING again" in capsys.readouterr().err
    fs = open_store(store)
    assert str(fs.items().path[0]) == str((tmp_path / "media" / "b.mkv").resolve())
    vals = fs.read("test_mean").values
    np.testing.assert_array_equal(vals[0], vals[1])  # row a re-extracted from the new file, same settings
    assert fs.read("test_caption").values[0, 0, 0] == len("uno")


def test_worker_dies_once_is_retried_and_always_is_worker_died(ray_session: None, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for name in ("ok_a", "die_once", "die_always", "ok_b"):
        write_video(media / f"{name}.mkv", np.full((4, 8, 8, 3), 40, np.uint8))
    store = tmp_path / "d.zarr"
    assert run_extract(media, store, "--max-retries", "1", features="test_mean") == 1
    out = capsys.readouterr().out
    assert "worker_died" in out
    fs = open_store(store)
    st = status_by_id(fs, "test_mean")
    assert st["die_once.mkv"] == (OK, "") and st["ok_a.mkv"][0] == OK and st["ok_b.mkv"][0] == OK
    assert st["die_always.mkv"] == (FAILED, "worker_died")
    assert (media / "die_once.mkv.died").exists()
    assert "2 retried" in out  # die_once once, die_always once (then the bound)


def test_input_errors_exit_2(ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    man, _ = make_dataset(tmp_path, n_good=1)
    assert run_extract(man, tmp_path / "x.zarr", "--strict") == 2
    err = capsys.readouterr().err
    assert "1 item file(s)" in err and "missing" in err and "--strict" in err
    assert not (tmp_path / "x.zarr").exists()  # nothing was started
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "path": "media/v0.mkv"}\n{"id": "a", "path": "media/v0.mkv"}\n')
    assert run_extract(dup, tmp_path / "y.zarr") == 2
    assert "duplicate item id 'a'" in capsys.readouterr().err
    assert run_extract(man, tmp_path / "z.zarr", features="nope") == 2
    assert "unknown feature(s) ['nope']" in capsys.readouterr().err


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def kill_case(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(manifest, slow config, clean store): one uninterrupted run shared by the kill tests."""
    root = tmp_path_factory.mktemp("kill")
    man, _ = make_dataset(root, n_good=6)
    cfg = root / "slow.yaml"
    cfg.write_text("extractor_options:\n  test_mean: {delay: 0.15}\n")
    clean = root / "clean.zarr"
    assert run_extract(man, clean, "--config", str(cfg), features="test_mean,test_rms") == 1
    return man, cfg, clean


@pytest.mark.parametrize("moment", ["while_writing", "any"])
def test_sigkill_driver_then_rerun_matches_clean_run(kill_case: tuple[Path, Path, Path], tmp_path: Path,
                                                     moment: str) -> None:
    """SIGKILL the driver (and its Ray) once items are being written, or at a random moment from its start."""
    man, cfg, clean = kill_case
    killed = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "pipelines.extract", str(man), "--store", str(killed), "--features",
           "test_mean,test_rms", "--plugins", PLUGIN, "--config", str(cfg), "--no-progress", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        if moment == "any":  # before Ray is up, during store creation, or while items run
            time.sleep(random.uniform(0.0, 12.0))
        else:
            deadline = time.time() + 120
            done = 0
            while time.time() < deadline and proc.poll() is None:  # wait until items are being written
                if (killed / "test_mean" / "status").exists():
                    try:
                        done = int((open_store(killed).status("test_mean") != PENDING).sum())
                    except Exception:
                        done = 0
                    if done >= 1:
                        break
                time.sleep(0.2)
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(random.uniform(0.0, 1.0))
    finally:
        _kill_driver_and_its_ray(proc)
    if moment == "while_writing":
        partial = open_store(killed).coverage()["test_mean"]
        assert partial["pending"] > 0, partial  # it really was interrupted
    assert run_extract(man, killed, "--config", str(cfg), features="test_mean,test_rms") == 1
    a, b = open_store(clean), open_store(killed)
    assert [str(i) for i in a.items().id] == [str(i) for i in b.items().id]
    for f in ("test_mean", "test_rms"):
        np.testing.assert_array_equal(a.status(f), b.status(f))
        np.testing.assert_array_equal(a.reasons(f), b.reasons(f))
        ra, rb = a.read(f), b.read(f)
        np.testing.assert_array_equal(ra.values, rb.values)
        np.testing.assert_array_equal(ra.mask, rb.mask)
        np.testing.assert_array_equal(ra.time, rb.time)
    assert not list(tmp_path.glob("killed.zarr.partial-*"))  # a half-made store from a kill is cleaned up


def _kill_driver_and_its_ray(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, the local Ray it started (its process group) and that Ray's workers, by pid."""
    table = proc_table()
    group = {p for p, (_, g) in table.items() if g == proc.pid}
    workers = {p for p, (pp, _) in table.items() if pp in group} - group  # actors run in their own groups
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in sorted(group | workers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.time() + 30
    while time.time() < end and any(p in proc_table() for p in group | workers):
        time.sleep(0.2)


def test_real_extractors_on_sample_dataset(ray_session: None, tmp_path: Path) -> None:
    """The shipped extractors (random weights; dlib and GloVe are real files) on the demo's sample dataset."""
    from pipelines.samples import make_sample_dataset

    man = make_sample_dataset(tmp_path / "sample")
    store = tmp_path / "real.zarr"
    feats = "resnet152,clip,vggish,dlib_face,clip_text,glove"
    extra = [a for p in PLUGIN.split(",") if p.endswith(".py") for a in ("--plugins", p)]
    assert main([str(man), "--store", str(store), "--features", feats, "--random-weights", "--no-progress",
                 *extra]) == 1  # the corrupt file
    fs = open_store(store)
    for f in ("resnet152", "clip", "vggish", "dlib_face"):
        st = status_by_id(fs, f)
        assert st["broken"] == (FAILED, "decode_error"), (f, st)
    for f in ("resnet152", "clip"):
        st = status_by_id(fs, f)
        assert all(st[i][0] == OK for i in st if i != "broken"), (f, st)
        b = fs.read(f)
        assert np.isfinite(b.values[b.mask]).all() and b.mask[b.available].any(axis=1).all()
        assert fs.provenance(f)["weights"] == {"random": True, "seed": 0}
    vg = status_by_id(fs, "vggish")
    assert vg["gradient_sound"][0] == OK and vg["astronaut_face"][0] == OK
    assert vg["gradient_silent"] == (ABSENT, "no_audio") and vg["coffee"][0] == ABSENT
    face = status_by_id(fs, "dlib_face")
    assert face["astronaut_face"][0] == OK and face["astronaut_still"][0] == OK
    assert face["gradient_silent"] == (ABSENT, "no_face")
    for f in ("clip_text", "glove"):
        assert fs.coverage()[f] == {"ok": 8, "absent": 0, "failed": 0, "pending": 0}
