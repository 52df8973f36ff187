"""Planning: which rows need work, caption chunking, and worker sizing that cannot starve on small machines."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import ConfigError, ExtractConfig
from pipelines.plan import (CaptionTask, ItemTask, cpu_bound_features, layout_pools, needs_work, plan_captions,
                            plan_items)
from store.common import load_yaml
from store.schema import Status

P, O, A, F = int(Status.PENDING), int(Status.OK), int(Status.ABSENT), int(Status.FAILED)


def test_needs_work_skips_ok_absent_and_failed_unless_retry() -> None:
    st = np.array([P, O, A, F], dtype=np.uint8)
    assert needs_work(st, False).tolist() == [True, False, False, False]
    assert needs_work(st, True).tolist() == [True, False, False, True]


def test_plan_items_groups_features_per_item() -> None:
    items = [(0, "a", "/a.mp4", "video"), (1, "b", "/b.mp4", "video"), (2, "c", "/c.png", "image"),
             (3, "d", "/d.mp4", "video")]
    statuses = {"x": np.array([P, O, F, P], np.uint8), "y": np.array([O, O, P, A], np.uint8)}
    tasks = plan_items(items, statuses, ["x", "y"], retry_failed=False, skip_ids={"d"})
    assert tasks == [ItemTask(0, "a", "/a.mp4", "video", ("x",)), ItemTask(2, "c", "/c.png", "image", ("y",))]
    tasks = plan_items(items, statuses, ["x", "y"], retry_failed=True)
    assert [(t.row, t.features) for t in tasks] == [(0, ("x",)), (2, ("x", "y")), (3, ("x",))]


def test_plan_captions_whole_chunks_merged_up_to_task_size() -> None:
    st = np.array([O, O, O, P, O, O, P, P, F, O], np.uint8)  # chunks of 2: [0,2) ok, [2,4) todo, ...
    tasks = plan_captions("t", st, 2, retry_failed=False)
    assert tasks == [CaptionTask("t", 2, 4), CaptionTask("t", 6, 8)]
    tasks = plan_captions("t", st, 2, retry_failed=True, rows_per_task=4)
    assert tasks == [CaptionTask("t", 2, 4), CaptionTask("t", 6, 10)]
    assert plan_captions("t", np.array([P] * 5, np.uint8), 2, retry_failed=False, rows_per_task=100) == [
        CaptionTask("t", 0, 5)]


def test_layout_cpu_only_fits_the_machine() -> None:
    (pool,) = layout_pools(["a", "b"], cluster_cpus=2, cluster_gpus=0)
    assert (pool.actors, pool.num_cpus, pool.num_gpus, pool.threads, pool.device) == (1, 2.0, 0.0, 2, "cpu")
    (pool,) = layout_pools(["a"], cluster_cpus=2, cluster_gpus=0, workers=4)
    assert pool.actors * pool.num_cpus <= 2 and pool.threads == 1  # fractional CPUs: all 4 actors start


def test_layout_gpus_split_dlib_to_cpu_pool() -> None:
    pools = layout_pools(["resnet152", "dlib_face"], cluster_cpus=16, cluster_gpus=2)
    gpu, cpu = pools
    assert gpu.features == ("resnet152",) and gpu.actors == 2 and gpu.num_gpus == 1 and gpu.device == "cuda"
    assert cpu.features == ("dlib_face",) and cpu.device == "cpu" and cpu.num_gpus == 0
    assert gpu.actors * gpu.num_cpus + cpu.actors * cpu.num_cpus <= 16
    (half,) = layout_pools(["clip"], cluster_cpus=4, cluster_gpus=1, gpus_per_worker=0.5)
    assert half.actors == 2 and half.num_gpus == 0.5


def test_config_yaml_and_unknown_keys(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("source: data\nstore: out.zarr\nfeatures: resnet152,clip\nmax-retries: 5\nplugins: [my.mod]\n")
    cfg = ExtractConfig.from_mapping(load_yaml(f)).validate()
    assert cfg.features == ["resnet152", "clip"] and cfg.max_retries == 5 and cfg.plugins == ["my.mod"]
    with pytest.raises(ConfigError, match="unknown key 'wrokers'"):
        ExtractConfig.from_mapping({"wrokers": 2})
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        ExtractConfig(source="s", store="t", workers=0).validate()
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(f)


@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("gpus", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("dlib_cuda", [False, True])
def test_layout_every_actor_fits_at_once(cpus: int, gpus: int, dlib_cuda: bool) -> None:
    feats = ["resnet152", "clip", "dlib_face", "clip_text"]
    bound = cpu_bound_features(feats, gpus, dlib_cuda=dlib_cuda)
    pools = layout_pools(feats, cluster_cpus=cpus, cluster_gpus=gpus, cpu_bound=bound)
    assert sum(p.actors * p.num_cpus for p in pools) <= cpus + 1e-9  # nothing waits for a CPU another holds
    assert sum(p.actors * p.num_gpus for p in pools) <= gpus + 1e-9
    assert all(p.num_cpus > 0 and p.actors >= 1 and p.threads >= 1 for p in pools)
    assert sorted(f for p in pools for f in p.features) == sorted(feats)  # every feature placed exactly once
    if gpus:
        gpu = next(p for p in pools if p.device == "cuda")
        assert gpu.actors == gpus and gpu.num_gpus == 1.0  # one worker per GPU
        assert ("dlib_face" in gpu.features) == dlib_cuda  # dlib on the GPU only when built with CUDA
    else:
        assert [p.device for p in pools] == ["cpu"] and pools[0].actors == max(1, cpus // 2)


def test_layout_gpus_per_worker_fraction_and_explicit_workers() -> None:
    (pool,) = layout_pools(["resnet152"], cluster_cpus=16, cluster_gpus=2, gpus_per_worker=0.25)
    assert (pool.actors, pool.num_gpus, pool.device) == (8, 0.25, "cuda")
    (pool,) = layout_pools(["resnet152"], cluster_cpus=16, cluster_gpus=2, workers=3, gpus_per_worker=0.5)
    assert (pool.actors, pool.num_gpus) == (3, 0.5)
    (pool,) = layout_pools(["resnet152"], cluster_cpus=16, cluster_gpus=2, gpus_per_worker=0)
    assert (pool.device, pool.num_gpus, pool.actors) == ("cpu", 0.0, 8)  # GPUs present but not asked for


def test_cpu_bound_features_follow_dlib_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    assert cpu_bound_features(["dlib_face", "clip"], 0) == ()  # no GPU: one pool anyway
    monkeypatch.setitem(sys.modules, "dlib", types.SimpleNamespace(DLIB_USE_CUDA=False))
    assert cpu_bound_features(["dlib_face", "clip"], 1) == ("dlib_face",)
    monkeypatch.setitem(sys.modules, "dlib", types.SimpleNamespace(DLIB_USE_CUDA=True))
    assert cpu_bound_features(["dlib_face", "clip"], 1) == ()
    assert cpu_bound_features(["clip"], 2, dlib_cuda=False) == ()


def _plan_items_loop(items, statuses, features, retry_failed, skip_ids):  # type: ignore[no-untyped-def]
    """The per-item loop plan_items replaced: the reference its vectorised form must equal."""
    out = []
    for row, item_id, path, kind in items:
        feats = tuple(f for f in features if item_id not in skip_ids and (
            statuses[f][row] == P or (retry_failed and statuses[f][row] == F)))
        if feats:
            out.append(ItemTask(row, item_id, path, kind, feats))
    return out


@pytest.mark.parametrize("retry_failed", [False, True])
def test_plan_items_equals_the_per_item_loop_on_a_random_status_mix(retry_failed: bool) -> None:
    rng = np.random.default_rng(7)
    n = 5000
    codes = np.array([P, O, A, F], np.uint8)
    statuses = {f: rng.choice(codes, n, p=p) for f, p in
                (("x", [0.3, 0.5, 0.1, 0.1]), ("y", [0.05, 0.9, 0.0, 0.05]), ("z", [0.5, 0.2, 0.2, 0.1]))}
    order = rng.permutation(n)[: n - 300]  # a subset of rows, not in row order (manifest order)
    items = [(int(r), f"id{r}", f"/v/{r}.mp4", "video" if r % 5 else "image") for r in order]
    skip = {f"id{r}" for r in rng.choice(order, 200, replace=False)}
    for feats in (["x", "y", "z"], ["z", "x"], ["y"]):
        got = plan_items(items, statuses, feats, retry_failed=retry_failed, skip_ids=skip)
        assert got == _plan_items_loop(items, statuses, feats, retry_failed, skip)
        assert len(got) > 100
    assert plan_items([], statuses, ["x"], retry_failed=retry_failed) == []
    assert plan_items(items, statuses, [], retry_failed=retry_failed) == []
