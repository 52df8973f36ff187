"""The driver: plan, create or extend the store, run items and caption chunks on Ray actors, retry dead workers.

The driver holds only ids, statuses and small summaries; workers write feature rows straight into the store.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from pipelines import reaper
from pipelines.config import ConfigError, ExtractConfig
from pipelines.dataset import Dataset, DatasetError, read_source
from pipelines.dispatch import Assignment, Dispatcher, Tally, WorkerId
from pipelines.plan import (CaptionTask, ItemTask, PoolSpec, cpu_bound_features, layout_pools, plan_captions,
                            plan_items)
from pipelines.rerun import check_manifest, check_settings, with_decode
from pipelines.worker import ExtractWorker, import_plugins, spec_from_description
from store.common import is_url
from store.schema import FeatureSpec, Status

if TYPE_CHECKING:
    from store.zarr_store import FeatureStore

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_EVERY_S = 2.0  # the driver packs finished store shards at most this often (each pack lists the staging area)


@dataclass
class RunResult:
    """Outcome of one run: per-feature coverage, top failure reasons and the exit code."""

    coverage: dict[str, dict[str, int]]
    reasons: dict[str, list[tuple[str, int]]]
    tasks: int
    seconds: float
    retried: int = 0
    exit_code: int = 0
    process_seconds: float = 0.0  # dispatch to last result, all workers up and models loaded
    process_window: tuple[float, float] = (0.0, 0.0)  # time.perf_counter() at its start and end (for profilers)
    log: list[str] = field(default_factory=list)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)  # feature -> weights identity (provenance)
    model_seconds: dict[str, float] = field(default_factory=dict)  # feature -> worker seconds inside its model
    task_seconds: float = 0.0  # worker seconds inside tasks (decode waits, models, writes), all workers

    def table(self) -> str:
        """Summary table: one line per feature with ok / absent / failed / pending and top failure reasons."""
        lines = [f"{'feature':<14}{'ok':>7}{'absent':>8}{'failed':>8}{'pending':>9}  top failure reasons"]
        for f, cov in self.coverage.items():
            top = ", ".join(f"{r} x{n}" for r, n in self.reasons.get(f, [])[:3]) or "-"
            lines.append(f"{f:<14}{cov['ok']:>7}{cov['absent']:>8}{cov['failed']:>8}{cov['pending']:>9}  {top}")
        return "\n".join(lines)

    def time_line(self) -> str:
        """Where the workers' time went: seconds inside each feature's extractor, largest first."""
        parts = [f"{f} {s:.1f}s" for f, s in sorted(self.model_seconds.items(), key=lambda kv: -kv[1])]
        return "worker time per feature: " + (", ".join(parts) if parts else "-")

    def weights_table(self) -> str:
        """One line per feature saying plainly which weights produced its values (real file or seeded random)."""
        return "weights per feature:\n" + "\n".join(f"  {f:<14}{describe_weights(w)}" for f, w in self.weights.items())


def describe_weights(identity: dict[str, Any]) -> str:
    """Human text for a provenance weights identity."""
    if identity.get("random"):
        why = identity.get("reason") or "--random-weights"
        return f"SEEDED RANDOM weights (seed {identity.get('seed', 0)}; {why}): values are NOT meaningful"
    if "file" in identity:
        unpinned = ", UNPINNED: not the published file" if identity.get("unpinned") else ""
        return f"real weights {identity['file']} (sha256 {str(identity.get('sha256', ''))[:16]}{unpinned})"
    parts = {k: v for k, v in identity.items() if isinstance(v, dict)}
    files = [v.get("file", k) + (" (UNPINNED)" if v.get("unpinned") else "") for k, v in parts.items()]
    return "real weights " + (", ".join(files) if files else str(identity))


DEFAULT_CAPTION_FEATURES = ("clip_text", "glove")


def default_features(has_captions: bool) -> list[str]:
    """Every registered item extractor (but `in_default_features = False` ones), plus clip_text and glove with captions."""
    from extract import _registry
    from extract._api import CaptionExtractor, Extractor

    def by_default(factory: object) -> bool:
        # a registered factory function (not a class) is an item extractor whose flags are unknown: included
        if not (isinstance(factory, type) and issubclass(factory, Extractor)):
            return True
        return not issubclass(factory, CaptionExtractor) and factory.in_default_features  # frames: only on request

    names = list(_registry.list_extractors())
    items = [n for n in names if by_default(_registry.extractor_class(n))]
    return items + ([n for n in DEFAULT_CAPTION_FEATURES if n in names] if has_captions else [])


def connect_ray(cfg: ExtractConfig) -> bool:
    """Join $RAY_ADDRESS / --address, or start a local Ray sized to the machine; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # Inside `ray job submit` the job's runtime env (working dir) already reaches every worker.
        ray.init(address=address, log_to_driver=True)
    else:
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        before = reaper.children_of(os.getpid())
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False, log_to_driver=True)
        reaper.start_reaper(before)  # a SIGKILLed driver would otherwise leave Ray's agents running
    return True


def _local_path(url: str) -> Path | None:
    """A local filesystem path for `url`, or None for object-store URLs."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if is_url(url) else Path(url)


def open_or_create_store(cfg: ExtractConfig, ds: Dataset, specs: dict[str, tuple[FeatureSpec, dict]]) -> FeatureStore:
    """Open the store (adding new items and feature groups) or create it complete, atomically on local disks."""
    from store.zarr_store import FeatureStore, StoreExistsError

    local = _local_path(cfg.store)
    exists = local.exists() if local is not None else _remote_exists(cfg.store, cfg.storage_options)
    if not exists:
        # FeatureStore.create builds local stores in a marked temp folder and renames it into place, so a driver
        # killed mid-creation never leaves a half-made store; it removes only temp folders it marked itself.
        try:
            return FeatureStore.create(cfg.store, ds.items, ds.captions, features=list(specs.values()),
                                       storage_options=cfg.storage_options)
        except StoreExistsError:
            pass  # another driver created it at the same moment: join it below (add items, features under a lock)
    store = FeatureStore.open(cfg.store, mode="r+", storage_options=cfg.storage_options)
    known = set(store.items().id.tolist())
    new_items = [r for r in ds.items if r.id not in known]
    known_caps = set(store.captions().id.tolist())
    new_caps = [c for c in ds.captions if c.id not in known_caps]
    if new_items or new_caps:
        store.add_items(new_items, new_caps)
    for spec, prov in specs.values():
        store.ensure_feature(spec, prov)
    return store


def _remote_exists(url: str, storage_options: dict[str, Any]) -> bool:
    """Whether an object-store URL already holds a zarr group."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs.exists(path.rstrip("/") + "/zarr.json")


def _create_decoders(ray: Any, cfg: ExtractConfig, cluster_cpus: float) -> list[Any]:
    """The decode stage's CPU actors (--decode-workers), placed on any node; each restarts after a crash."""
    from pipelines.decode_stage import DecodeWorker, decode_actor_cpus

    if cfg.decode_workers <= 0:
        return []
    cpus = decode_actor_cpus(cfg.decode_workers, cluster_cpus)
    # two concurrent streams per actor: one blocked on backpressure (read ahead) never stalls the next item's
    remote = ray.remote(DecodeWorker).options(num_cpus=cpus, max_concurrency=2, max_restarts=1000,
                                              max_task_retries=0)
    return [remote.remote(threads=1) for _ in range(cfg.decode_workers)]


def _create_pool(ray: Any, pool: PoolSpec, cfg: ExtractConfig, decoders: list[Any] | None = None,
                 first_index: int = 0) -> list[Any]:
    """Start the pool's actors; each restarts after a crash (the driver re-queues its item)."""
    remote = ray.remote(ExtractWorker)
    kwargs = {
        "weights_dir": cfg.weights_dir,
        "random_init": cfg.random_weights,
        "allow_download": cfg.allow_download,
        "seed": cfg.seed,
        "device": pool.device,
        "precision": cfg.precision,
    }
    return [
        remote.options(
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=1000, max_task_retries=0
        ).remote(
            list(pool.features),
            plugins=list(cfg.plugins),
            extractor_kwargs=kwargs,
            extractor_options=cfg.extractor_options,
            threads=pool.threads,
            frame_rule=cfg.frame_rule,
            batch_size=cfg.batch_size,
            decode_height=cfg.decode_height,
            queue_size=cfg.queue_size,
            # CPU actors give their CPUs to torch; one decoder thread beside it avoids oversubscribing them
            decode_threads=1 if pool.device == "cpu" else 0,
            decoders=list(decoders or []),
            worker_index=first_index + i,
            storage_options=cfg.storage_options,  # workers open the store by URL: they need the same options
        )
        for i in range(pool.actors)
    ]


def _describe(ray: Any, pools: list[PoolSpec], actors: list[list[Any]], err: TextIO) -> dict[str, dict]:
    """Ask one actor per pool for its extractors' specs; explain if the cluster cannot place the actors."""
    refs = [acts[0].describe.remote() for acts in actors]
    waited = 0.0
    while True:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30.0)
        if len(ready) == len(refs):
            break
        waited += 30.0
        need = ", ".join(f"{p.actors}x(cpu={p.num_cpus:g}, gpu={p.num_gpus:g})" for p in pools)
        print(f"tvr-extract: still waiting for workers after {waited:.0f}s; they need {need}; cluster has "
              f"{ray.cluster_resources()}", file=err)
    out: dict[str, dict] = {}
    for ref in refs:
        try:
            out.update(ray.get(ref))
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ConfigError(f"workers could not create the extractors: {lines[-1] if lines else e}") from e
    return out


def _read_dataset(cfg: ExtractConfig, err: TextIO) -> Dataset:
    """The dataset; with --strict, an error listing unreadable files; a note naming dropped empty captions."""
    ds = read_source(cfg.source)
    if ds.missing and cfg.strict:
        shown = "\n  ".join(ds.problems[i][1] for i in ds.missing[:50])
        raise DatasetError(f"{len(ds.missing)} item file(s) listed in {ds.source!r} cannot be read (--strict):\n  "
                           f"{shown}\nfix the paths or drop --strict to record them as FAILED rows")
    if ds.dropped_captions:
        shown = ", ".join(ds.dropped_captions[:10]) + (", ..." if len(ds.dropped_captions) > 10 else "")
        print(f"tvr-extract: dropped {len(ds.dropped_captions)} empty caption(s) of {ds.source!r} ({shown}); the "
              "other captions keep their ids", file=err)
    return ds


def _existing_store(cfg: ExtractConfig, ds: Dataset, err: TextIO) -> FeatureStore | None:
    """The store opened read-only when it exists, after checking (or, with --update-manifest, applying) the
    manifest's changes; None for a new store."""
    from store.zarr_store import FeatureStore

    local = _local_path(cfg.store)
    if not (local.exists() if local is not None else _remote_exists(cfg.store, cfg.storage_options)):
        return None
    store = FeatureStore.open(cfg.store, mode="r", storage_options=cfg.storage_options)
    check_manifest(store, ds, update=cfg.update_manifest, err=err)
    return store


def run(cfg: ExtractConfig, *, err: TextIO | None = None) -> RunResult:
    """Run one extraction; never raises for per-item problems (they become FAILED rows)."""
    err = err if err is not None else sys.stderr
    t_start = time.perf_counter()
    cfg.validate()
    import_plugins(cfg.plugins)
    ds = _read_dataset(cfg, err)
    existing = _existing_store(cfg, ds, err)  # refuses a changed manifest before anything starts
    import extract  # noqa: F401  (registers the built-in extractors)
    from extract import _registry

    available = list(_registry.list_extractors())
    requested = list(cfg.features) if cfg.features else default_features(bool(ds.captions))
    unknown = [f for f in requested if f not in available]
    if unknown:
        raise ConfigError(f"unknown feature(s) {unknown}; registered extractors: {available} "
                          f"(add your own with --plugins)")

    import ray

    owns_ray = connect_ray(cfg)
    actors: list[list[Any]] = []
    decoders: list[Any] = []
    try:
        res = ray.cluster_resources()
        cpu_bound = cpu_bound_features(requested, float(res.get("GPU", 0)))
        decoders = _create_decoders(ray, cfg, res.get("CPU", 1))
        from pipelines.decode_stage import decode_actor_cpus

        model_cpus = res.get("CPU", 1) - cfg.decode_workers * decode_actor_cpus(cfg.decode_workers, res.get("CPU", 1))
        pools = layout_pools(requested, cluster_cpus=model_cpus, cluster_gpus=res.get("GPU", 0),
                             workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                             cpus_per_worker=cfg.cpus_per_worker, cpu_bound=cpu_bound)
        actors = [_create_pool(ray, p, cfg, decoders, sum(q.actors for q in pools[:i])) for i, p in enumerate(pools)]
        desc = _describe(ray, pools, actors, err)
        ray.get([d.pid.remote() for d in decoders])  # decode actors up (PyAV loaded) before the clock starts
        provs = {f: with_decode(desc[f]["provenance"], desc[f]["needs_frames"], cfg) for f in requested}
        specs = {f: (spec_from_description(desc[f]), provs[f]) for f in requested}
        if existing is not None:
            check_settings(existing, specs)
        weights = {f: dict(specs[f][1].get("weights", {})) for f in requested}
        for f, w in weights.items():
            if w.get("random"):
                print(f"tvr-extract: {f}: {describe_weights(w)}", file=err)
        item_feats = [f for f in requested if specs[f][0].axis == "item"]
        cap_feats = [f for f in requested if specs[f][0].axis == "caption"]
        store = open_or_create_store(cfg, ds, specs)
        check_settings(store, specs)  # again: another driver may have created these groups since the first check
        result = _execute(ray, cfg, ds, store, pools, actors, item_feats, cap_feats, err)
        result.weights = weights
    finally:
        for a in [a for acts in actors for a in acts] + decoders:  # free the cluster even when the run stops early
            ray.kill(a)
        if owns_ray:
            ray.shutdown()
            reaper.stop_reaper()
    result.seconds = time.perf_counter() - t_start
    return result


def _execute(ray: Any, cfg: ExtractConfig, ds: Dataset, store: FeatureStore, pools: list[PoolSpec],
             actors: list[list[Any]], item_feats: list[str], cap_feats: list[str], err: TextIO) -> RunResult:
    """Mark unreadable files, plan, run the tasks through a Dispatcher on the actors, summarise."""
    queues = _plan(cfg, ds, store, pools, item_feats, cap_feats)
    cap_texts = store.captions().text if cap_feats else None
    total = sum(len(q) for q in queues)
    if total:  # every worker has its models loaded and the store open before the clock starts
        ray.get([a.ready.remote(cfg.store) for acts in actors for a in acts])
    t_process = time.perf_counter()
    bar = _progress(total, cfg.progress, err)

    def progress(tally: Tally) -> None:
        bar.update(1)
        bar.set_postfix(ok=tally.ok, failed=tally.failed, refresh=False)

    disp = Dispatcher(queues, [len(a) for a in actors], lambda t, r, m: _mark_failed(store, t, r, m),
                      max_retries=cfg.max_retries, prefetch=bool(cfg.queue_size or cfg.decode_workers),
                      lookahead=_lookahead(cfg, actors), group=_call_items(cfg), in_flight=cfg.items_in_flight,
                      on_done=progress,
                      log=lambda line: print(f"tvr-extract: {line}", file=err))
    try:
        _drive(ray, disp, actors, cfg, cap_texts, store)
    finally:
        bar.close()
    t_end = time.perf_counter()
    process_seconds = t_end - t_process
    store.pack_ready(partial=True)  # everything this run finished, so xarray/dask and copies see it
    cov_all = store.coverage()
    feats = item_feats + cap_feats
    coverage = {f: cov_all[f] for f in feats}
    reasons = {}
    for f in feats:
        st = np.asarray(store.status(f))
        rs = np.asarray(store.reasons(f))[st == Status.FAILED]
        reasons[f] = Counter(str(r) for r in rs).most_common()
    any_failed = any(c["failed"] > 0 for c in coverage.values())
    t = disp.tally
    return RunResult(coverage=coverage, reasons=reasons, tasks=total, seconds=0.0, retried=t.retried,
                     exit_code=1 if any_failed else 0, process_seconds=process_seconds,
                     process_window=(t_process, t_end),
                     model_seconds={f: float(t.model_seconds[f]) for f in feats if f in t.model_seconds},
                     task_seconds=t.task_seconds)


CALL_ROUNDS = 4  # with --items-in-flight K, a call holds 4K items: a call's tail (fewer items left to feed the
# models, its last batch part-empty) comes once per 4K items; a call that dies retries each of its items alone


def _call_items(cfg: ExtractConfig) -> int:
    """Items per worker call: 1, or CALL_ROUNDS x --items-in-flight (the worker streams K of them at a time)."""
    return 1 if cfg.items_in_flight <= 1 else CALL_ROUNDS * cfg.items_in_flight


def _lookahead(cfg: ExtractConfig, actors: list[list[Any]]) -> int:
    """Items a model worker names ahead: 1 (its decode thread), or enough for the decode stage's actors to share."""
    if cfg.decode_workers <= 0:
        return 1
    models = max(1, sum(len(a) for a in actors))
    return max(2, -(-cfg.decode_workers // models) + 1)


def _plan(cfg: ExtractConfig, ds: Dataset, store: FeatureStore, pools: list[PoolSpec], item_feats: list[str],
          cap_feats: list[str]) -> list[list[ItemTask | CaptionTask]]:
    """FAILED rows for unreadable files; then each pool's tasks (items, and caption chunks in one pool)."""
    table = store.items()
    row_of = {str(i): r for r, i in enumerate(table.id.tolist())}
    statuses = {f: np.asarray(store.status(f)) for f in item_feats + cap_feats}
    for item_id, (reason, message) in ds.problems.items():  # missing file, directory, symlink loop
        row = row_of[item_id]
        for f in item_feats:
            st = statuses[f][row]
            if st == Status.PENDING or (cfg.retry_failed and st == Status.FAILED):
                store.write_failed(f, row, reason, message)
    entries = [(row_of[r.id], r.id, r.path, r.kind) for r in ds.items]
    queues: list[list[ItemTask | CaptionTask]] = []
    for p in pools:
        feats = [f for f in p.features if f in item_feats]
        queues.append(list(plan_items(entries, statuses, feats, retry_failed=cfg.retry_failed,
                                      skip_ids=set(ds.missing))) if feats else [])
    cap_pool = next((i for i, p in enumerate(pools) if any(f in p.features for f in cap_feats)), 0)
    for f in cap_feats:
        queues[cap_pool].extend(plan_captions(f, statuses[f], store.spec(f).chunk_rows,
                                              retry_failed=cfg.retry_failed, rows_per_task=cfg.caption_chunk))
    return queues


def _drive(ray: Any, disp: Dispatcher, actors: list[list[Any]], cfg: ExtractConfig, cap_texts: Any,
           store: FeatureStore) -> None:
    """The Ray side of the dispatcher: submit its assignments and pings, turn finished refs into its events."""
    from ray.exceptions import RayActorError

    inflight: dict[Any, tuple[bool, WorkerId]] = {}  # ref -> (is a ping, worker)
    next_pack = time.monotonic() + PACK_EVERY_S
    while not disp.done or inflight:
        for a in disp.assignments():
            inflight[_submit(actors[a.worker[0]][a.worker[1]], cfg, a, cap_texts)] = (False, a.worker)
        for w in (disp.pings_due() if not disp.done else ()):  # with no work left, a lost worker is not waited for
            inflight[actors[w[0]][w[1]].pid.remote()] = (True, w)
        if not inflight:
            time.sleep(0.2)
            continue
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            ping, w = inflight.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError as e:
                # Ray reports both "died running this task" and "restarting" this way; an actor runs one task at a
                # time and gets none until a ping succeeds, so this task was the one.
                disp.ping_failed(w) if ping else disp.died(w, str(e))
                continue
            except Exception as e:  # a bug in the worker itself: keep the run going, record it
                disp.ping_failed(w) if ping else disp.error(w, str(e))
                continue
            disp.back(w) if ping else disp.result(w, value)
        if time.monotonic() >= next_pack:  # move finished shards out of staging as the run goes
            store.pack_ready()
            next_pack = time.monotonic() + PACK_EVERY_S


def _submit(actor: Any, cfg: ExtractConfig, a: Assignment, cap_texts: Any) -> Any:
    """Send one call to an actor (with the paths of its next items to prefetch); returns the result ref."""
    task = a.task
    if a.more:  # several items in flight on the worker, sharing model batches
        items = [(t.row, t.path, list(t.features)) for t in a.tasks if isinstance(t, ItemTask)]
        return actor.process_many.remote(cfg.store, items, a.hint, cfg.items_in_flight)
    if isinstance(task, ItemTask):
        return actor.process.remote(cfg.store, task.row, task.path, list(task.features), a.hint)
    texts = [str(t) for t in cap_texts[task.start:task.stop]]
    return actor.captions.remote(cfg.store, task.feature, task.start, texts)


def _mark_failed(store: FeatureStore, task: ItemTask | CaptionTask, reason: str, message: str) -> None:
    """Driver-side FAILED rows for a task whose worker never reported back."""
    if isinstance(task, ItemTask):
        for f in task.features:
            store.write_failed(f, task.row, reason, message)
    else:
        for r in range(task.start, task.stop, store.spec(task.feature).chunk_rows):
            store.write_failed(task.feature, r, reason, message)


class _NoBar:
    """Stand-in when progress output is off."""

    def update(self, n: int = 1) -> None:
        """Ignore."""

    def set_postfix(self, **kw: Any) -> None:
        """Ignore."""

    def close(self) -> None:
        """Ignore."""


def _progress(total: int, enabled: bool, err: TextIO) -> Any:
    """A tqdm bar on stderr (tasks done, ok/failed, ETA), or a no-op."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="task", file=err, dynamic_ncols=True, desc="extract", mininterval=0.5)
