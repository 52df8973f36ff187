"""The extraction worker: holds models once, decodes each item once, feeds every extractor, writes its rows.

`ExtractWorker` is a plain class (testable without Ray); `pipelines.run` wraps it with `ray.remote`. Each item runs
through `extract.engine` (probe, one decode, every session fed, a row or a failure per feature), the code
`Extractor.extract_path` runs. Decoding runs in a thread that fills a bounded queue while the calling thread runs the
models, or, with decode actors (`pipelines.decode_stage`, --decode-workers), in other processes that stream batches
through Ray's object store; either way decode overlaps compute.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from extract import engine
from store.schema import FeatureSpec, Status

_DONE = object()


def import_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin (a module name, or a path to a .py file) once per process, to register extractors."""
    for plugin in plugins:
        if plugin.endswith(".py") or os.sep in plugin or "/" in plugin:
            path = Path(plugin).resolve()
            name = "tvr_plugin_" + path.stem
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"plugin file {str(path)!r} cannot be imported; give a .py file or a module name")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(plugin)


_short = engine.short_error


class ExtractWorker:
    """Creates the extractors of `features` once and runs items and caption chunks through them."""

    def __init__(
        self,
        features: Sequence[str],
        *,
        plugins: Sequence[str] = (),
        extractor_kwargs: Mapping[str, Any] | None = None,
        extractor_options: Mapping[str, Mapping[str, Any]] | None = None,
        threads: int = 1,
        frame_rule: str = "nearest",
        batch_size: int = 16,
        decode_height: int | None = None,
        queue_size: int = 4,
        decode_threads: int = 0,
        select_frames: bool = True,
        decoders: Sequence[Any] = (),
        worker_index: int = 0,
    ) -> None:
        """`threads`: torch intra-op threads; `decode_threads`: FFmpeg decoder threads (0: FFmpeg decides);
        `select_frames`: colour-convert only the frames some extractor reads (extract.engine.plan_streams);
        `decoders`: DecodeWorker actor handles (pipelines.decode_stage): items are decoded there, not here.

        Frames are always decoded on the 25 fps grid every extractor samples its steps from (DECODE_FPS).
        """
        import torch

        import extract  # noqa: F401  (registers the built-in extractors)
        from extract import _registry

        torch.set_num_threads(max(1, int(threads)))
        import_plugins(plugins)
        from extract._api import RandomWeightsWarning

        kw = dict(extractor_kwargs or {})
        opts = extractor_options or {}
        with warnings.catch_warnings():  # extract also logs it, and the driver names every random feature
            warnings.simplefilter("ignore", RandomWeightsWarning)
            self.extractors = {f: _registry.create_extractor(f, **kw, **dict(opts.get(f, {}))) for f in features}
        self.frame_rule, self.batch_size, self.height = frame_rule, batch_size, decode_height
        self.queue_size = queue_size
        self.decode_threads = int(decode_threads)
        self.decode = engine.DecodeOptions(frame_rule=frame_rule, batch_size=batch_size, height=decode_height,
                                           threads=self.decode_threads, select=select_frames)
        self._stores: dict[str, Any] = {}
        self._prefetched: _Stream | None = None  # the next item's decode, started early
        self._pool = None
        if decoders:
            from pipelines.decode_stage import DecoderPool

            self._pool = DecoderPool(list(decoders), self.decode, start=worker_index)
        self._ahead: dict[str, tuple[Any, Any]] = {}  # path -> (MediaInfo, RemoteDecode) opened ahead of its item

    def describe(self) -> dict[str, dict[str, Any]]:
        """Spec (JSON), provenance and needs of every extractor, for the driver to create store groups."""
        out = {}
        for name, ex in self.extractors.items():
            out[name] = {
                "spec": ex.spec.to_json(),
                "provenance": ex.provenance(),
                "needs_frames": bool(getattr(ex, "needs_frames", True)),
                "needs_audio": bool(getattr(ex, "needs_audio", False)),
            }
        return out

    def pid(self) -> int:
        """The worker's process id (tests use it to see restarts)."""
        return os.getpid()

    def _store(self, url: str) -> Any:
        """The store at `url`, opened for writing once per worker."""
        if url not in self._stores:
            from store.zarr_store import FeatureStore

            self._stores[url] = FeatureStore.open(url, mode="r+")
        return self._stores[url]

    # ---------------------------------------------------------------- items
    def process(self, store_url: str, row: int, path: str, features: Sequence[str],
                prefetch: tuple[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """Extract `features` for item `row` from `path`, write each row (status last); return a small summary.

        The item runs through `extract.engine` (the code `Extractor.extract_path` runs). `prefetch` = (path,
        features) of this worker's next item: its decoding starts as soon as this item's stream is decoded, so it
        overlaps this item's remaining compute (models that run at `finish`) and writes.
        """
        t0 = time.perf_counter()
        store = self._store(store_url)
        ahead = self._ahead.pop(path, None)  # probed when its decode was opened: not probed twice
        info, failed = (ahead[0], None) if ahead is not None else engine.probe_failure(path)
        if failed is not None:
            if self._pool is not None:
                self._open_ahead(prefetch)
            elif prefetch is not None and self.queue_size:
                self._prefetch(*prefetch)
            outcome = engine.ItemOutcome(failures=dict.fromkeys(features, failed), spent=dict.fromkeys(features, 0.0))
            return self._write(store, row, features, outcome, t0)
        run = engine.ItemRun(self.extractors, info, features)
        plan = run.plan(self.decode.select)
        live: Any = None
        stream: Iterable[tuple[str, Any]] = ()
        if self._pool is not None:  # the decode stage: this item's stream, then the next items' start at once
            live = ahead[1] if ahead is not None else None
            if live is not None and (live.plan != plan or not run.live):
                live.close()
                live = None
            live = live or (self._pool.open(path, info, plan) if run.live else None)
            self._open_ahead(prefetch)
            prefetch = None
            stream = live.items() if live is not None else ()
        elif run.live and self.queue_size:
            live = self._take_prefetched(path, plan) or self._start_decode(path, plan)
            stream = live.items()
        elif run.live:
            stream = engine.decode_streams(path, plan, self.decode)
        try:
            for kind, payload in stream:
                run.feed(kind, payload)
                if not run.live:
                    break
        finally:
            if live is not None:
                live.close()
        if prefetch is not None and self.queue_size:
            self._prefetch(*prefetch)
        return self._write(store, row, features, run.finish(), t0)

    def _write(self, store: Any, row: int, features: Sequence[str], outcome: engine.ItemOutcome,
               t0: float) -> dict[str, Any]:
        """Write every feature's row or FAILED row (status last, by the store); the summary for the driver."""
        results: dict[str, tuple[int, str]] = {}
        for f in features:
            fail = outcome.failures.get(f)
            if fail is None:
                rows = outcome.rows[f]
                try:
                    store.write(f, row, rows)
                    results[f] = (int(rows.status), rows.reason)
                    continue
                except Exception as e:  # a malformed result must not take the item's other features down
                    fail = engine.Failure("write_error", f"write_error: {_short(e)}")
            store.write_failed(f, row, fail.reason, fail.message[:2000])
            results[f] = (int(Status.FAILED), fail.reason)
        return self._summary(row, results, t0, outcome.spent)

    def _open_ahead(self, prefetch: Any) -> None:
        """Open remote decodes for the named next items (one (path, features) or a list); close the others."""
        hints = [prefetch] if isinstance(prefetch, tuple) else list(prefetch or [])
        wanted = {str(p) for p, _ in hints}
        for p in [p for p in self._ahead if p not in wanted]:
            self._ahead.pop(p)[1].close()
        for p, feats in hints:
            if p in self._ahead:
                continue
            info, failed = engine.probe_failure(p)
            if failed is None:  # a probe failure is left for its own process() call to record
                exs = [self.extractors[f] for f in feats if f in self.extractors]
                self._ahead[p] = (info, self._pool.open(p, info, engine.plan_streams(exs, info, self.decode.select)))

    def _start_decode(self, path: str, plan: engine.StreamPlan) -> "_Stream":
        """A decode thread filling a bounded queue for `path`."""
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=max(1, self.queue_size))
        thread = threading.Thread(target=self._decode_into, args=(path, plan, q, stop), daemon=True)
        thread.start()
        return _Stream(path, plan, q, stop, thread)

    def _prefetch(self, path: str, features: Sequence[str]) -> None:
        """Start decoding the next item; a probe failure is left for its own `process` call to record."""
        if self._prefetched is not None:
            self._prefetched.close()
            self._prefetched = None
        info, failed = engine.probe_failure(path)
        if failed is not None:
            return
        exs = [self.extractors[f] for f in features if f in self.extractors]
        self._prefetched = self._start_decode(path, engine.plan_streams(exs, info, self.decode.select))

    def _take_prefetched(self, path: str, plan: engine.StreamPlan) -> "_Stream | None":
        """The prefetched stream when it is this item's, decoding the same streams and frames; otherwise drop it."""
        pre, self._prefetched = self._prefetched, None
        if pre is not None and (pre.path, pre.plan) == (path, plan):
            return pre
        if pre is not None:
            pre.close()
        return None

    def _decode_into(self, path: str, plan: engine.StreamPlan, q: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: frame batches, then audio chunks, then the end marker (errors in between)."""

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        _lower_priority()
        try:
            for item in engine.decode_streams(path, plan, self.decode):
                if not put(item):
                    return
        except BaseException as e:  # not an Exception (e.g. SystemExit): every requested stream counts as failed
            for kind, wanted in (("frames_error", plan.frames), ("audio_error", plan.audio)):
                if wanted:
                    put((kind, e))
        put(_DONE)  # the consumer reads on after a stream's error, so the end marker always follows

    @staticmethod
    def _drain(q: queue.Queue) -> Iterator[tuple[str, Any]]:
        """Items from the decode queue until the end marker."""
        while True:
            item = q.get()
            if item is _DONE:
                return
            yield item

    @staticmethod
    def _summary(row: int, results: dict[str, tuple[int, str]], t0: float,
                 spent: dict[str, float] | None = None) -> dict[str, Any]:
        """What goes back to the driver: statuses, reasons and timings only, never arrays."""
        return {"row": row, "results": results, "seconds": time.perf_counter() - t0, "pid": os.getpid(),
                "model_seconds": dict(spent or {})}

    # ------------------------------------------------------------- captions
    def captions(self, store_url: str, feature: str, start: int, texts: Sequence[str]) -> dict[str, Any]:
        """Encode caption rows [start, start+len(texts)) and write them as whole chunks."""
        t0 = time.perf_counter()
        store = self._store(store_url)
        try:
            t = time.perf_counter()
            rows = self.extractors[feature].encode_captions(list(texts))
            spent = time.perf_counter() - t
            if len(rows) != len(texts):
                raise ValueError(f"encode_captions returned {len(rows)} rows for {len(texts)} captions")
            store.write_block(feature, start, rows)
            statuses = [(int(r.status), r.reason) for r in rows]
        except Exception as e:
            msg = f"extractor_error: {_short(e)}"
            for r in range(start, start + len(texts), store.spec(feature).chunk_rows):
                store.write_failed(feature, r, "extractor_error", msg)
            statuses = [(int(Status.FAILED), "extractor_error")] * len(texts)
            spent = time.perf_counter() - t0
        return {"feature": feature, "start": start, "results": statuses, "seconds": time.perf_counter() - t0,
                "model_seconds": {feature: spent}}


DECODE_NICE = 5  # decode threads yield to model threads on shared CPUs; they only need to stay ahead


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux threads are tasks with their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


@dataclass
class _Stream:
    """One item's decode thread and the bounded queue it fills."""

    path: str
    plan: engine.StreamPlan
    queue: queue.Queue
    stop: threading.Event
    thread: threading.Thread

    def items(self) -> Iterator[tuple[str, Any]]:
        """Items from the queue until the end marker."""
        return ExtractWorker._drain(self.queue)

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and wait for it."""
        self.stop.set()
        self.thread.join(timeout=30)


def spec_from_description(desc: Mapping[str, Any]) -> FeatureSpec:
    """The FeatureSpec inside one `ExtractWorker.describe()` entry."""
    return FeatureSpec.from_json(desc["spec"])
