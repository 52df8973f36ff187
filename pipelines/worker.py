"""The extraction worker: holds models once, decodes each item once, feeds every extractor, writes its rows.

`ExtractWorker` is a plain class (testable without Ray); `pipelines.run` wraps it with `ray.remote`. Each item runs
through `extract.engine` (probe, one decode, every session fed, a row or a failure per feature), the code
`Extractor.extract_path` runs. Decoding runs in a thread that fills a bounded queue while the calling thread runs the
models, or, with decode actors (`pipelines.decode_stage`, --decode-workers), in other processes that stream batches
through Ray's object store; either way decode overlaps compute. `process_many` runs several items at once
(--items-in-flight): their streams are merged as batches arrive and their frames share model batches.
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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from extract import engine
from store.schema import FeatureSpec, Status

_DONE = object()
Hint = tuple[str, Sequence[str]] | list[tuple[str, Sequence[str]]] | None  # the next items: (path, features)


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
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`threads`: torch intra-op threads; `decode_threads`: FFmpeg decoder threads (0: FFmpeg decides);
        `select_frames`: colour-convert only the frames some extractor reads (extract.engine.plan_streams);
        `decoders`: DecodeWorker actor handles (pipelines.decode_stage): items are decoded there, not here;
        `storage_options`: fsspec options of the store URL every task names (from the run config).

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
        self._storage_options = dict(storage_options or {})  # fsspec options of the store URL (the run config's)
        self._wake = threading.Event()  # set by every producer thread after each put (the merged read waits on it)
        self._pool = None
        if decoders:
            from pipelines.decode_stage import DecoderPool

            self._pool = DecoderPool(list(decoders), self.decode, start=worker_index)
        # path -> future of (MediaInfo, RemoteDecode or decode thread) opened ahead of its item, None when its
        # probe failed; a thread of its own probes and opens them: the model thread does not wait on file opens
        self._ahead: dict[str, Future[tuple[Any, Any] | None]] = {}
        self._opener = ThreadPoolExecutor(1, thread_name_prefix="tvr-open-ahead")

    def describe(self) -> dict[str, dict[str, Any]]:
        """Spec (JSON), provenance and needs of every extractor, for the driver to create store groups."""
        out = {}
        for name, ex in self.extractors.items():
            out[name] = {
                "spec": ex.spec.to_json(),
                "provenance": ex.provenance(),
                "needs_frames": ex.needs_frames,
                "needs_audio": ex.needs_audio,
            }
        return out

    def pid(self) -> int:
        """The worker's process id (tests use it to see restarts)."""
        return os.getpid()

    def ready(self, store_url: str) -> int:
        """Open the store before the first item (the driver waits for this, as for the models); the process id."""
        self._store(store_url)
        return os.getpid()

    def _store(self, url: str) -> Any:
        """The store at `url`, opened for writing once per worker."""
        if url not in self._stores:
            from store.zarr_store import FeatureStore

            self._stores[url] = FeatureStore.open(url, mode="r+", storage_options=self._storage_options)
        return self._stores[url]

    # ---------------------------------------------------------------- items
    def process(self, store_url: str, row: int, path: str, features: Sequence[str],
                prefetch: Hint = None) -> dict[str, Any]:
        """Extract `features` for item `row` from `path`, write each row (status last); return a small summary.

        The item runs through `extract.engine` (the code `Extractor.extract_path` runs). `prefetch` = (path,
        features) of this worker's next item(s): their decoding starts as soon as this item's stream is decoded,
        so it overlaps this item's remaining compute (models that run at `finish`) and writes.
        """
        return self.process_many(store_url, [(row, path, features)], prefetch)["items"][0]

    def process_many(self, store_url: str, items: Sequence[tuple[int, str, Sequence[str]]],
                     prefetch: Hint = None, in_flight: int = 0) -> dict[str, list[dict[str, Any]]]:
        """Several items at once: their streams are read as batches arrive and their frames share model batches
        (`extract.engine.run_group`); each item's rows are written (status last) as soon as that item ends, and a
        failure stays in its item. With `in_flight` K, at most K items stream at once and each item that ends
        starts the call's next one (its decode opened ahead), so a call's tail, where fewer items feed the
        models, comes once per call rather than once per K items. Returns {"items": [one summary per item, in
        the order they ended]}."""
        store = self._store(store_url)
        feats = {row: list(f) for row, _, f in items}
        todo = deque(items)
        limit = max(1, int(in_flight) or len(items))
        hints = [prefetch] if isinstance(prefetch, tuple) else list(prefetch or [])
        runs: dict[int, engine.ItemRun] = {}
        streams: dict[int, Any] = {}
        streaming: set[int] = set()  # rows whose stream has not ended
        out: list[dict[str, Any]] = []
        clock = [time.perf_counter()]  # each summary's seconds run from the previous item's end: they add up

        def write(row: int, outcome: engine.ItemOutcome) -> None:
            out.append(self._write(store, row, feats[row], outcome, clock[0]))
            clock[0] = time.perf_counter()

        def start_next() -> None:
            """Start the call's next items while fewer than `limit` stream; then open the decodes ahead."""
            while todo and len(streaming) < limit:
                row, path, features = todo.popleft()
                info, failed = self._info(path)
                run = engine.ItemRun(self.extractors, info, features) if failed is None else None
                if run is None or not run.live:
                    write(row, run.finish() if run is not None else _failed_outcome(features, failed))
                    continue
                runs[row] = run
                streams[row] = self._open(path, info, run.plan(self.decode.select))
                streaming.add(row)
            ahead = [(p, f) for _, p, f in todo] + hints
            if self._pool is not None:  # decode actors: the next items' decodes start now
                n = max(len(hints), limit)
            elif todo:  # decode threads: the call's next item
                n = 1
            else:  # decode threads: as the call's last streams end, as many of the next call's decodes start
                n = -(-len(hints) * (limit - len(streaming)) // limit)
            self._open_ahead(ahead[:n])

        def ended(row: int) -> None:
            """A stream ended (or its item finished first): the call's next item takes its place."""
            if row in streaming:
                streaming.discard(row)
                start_next()

        try:
            start_next()
            for row, outcome in engine.run_group(runs, self._events(streams, ended)):
                live = streams.pop(row, None)
                if live is not None:
                    live.close()
                write(row, outcome)
                ended(row)
        finally:
            for live in streams.values():
                live.close()
            for run in runs.values():  # only after an exception: their queued model inputs are dropped
                run.abandon()
        return {"items": out}

    def _opened(self, path: str) -> tuple[Any, Any] | None:
        """(MediaInfo, decode) of `path` opened ahead (waiting for the opener thread), None when it was not."""
        fut = self._ahead.get(path)
        try:
            return fut.result() if fut is not None else None
        except Exception:  # noqa: BLE001 - opening ahead failed: the item's own call opens it and reports why
            return None

    def _info(self, path: str) -> tuple[Any, engine.Failure | None]:
        """The item's MediaInfo (probed when its decode was opened ahead: not probed twice), or its failure."""
        ahead = self._opened(path)
        return (ahead[0], None) if ahead is not None else engine.probe_failure(path)

    def _open(self, path: str, info: Any, plan: engine.StreamPlan) -> Any:
        """The item's stream: opened ahead (when its plan matches), else started now; something with close()."""
        ahead = self._opened(path)
        self._ahead.pop(path, None)
        early = ahead[1] if ahead is not None else None
        if early is not None and early.plan != plan:
            early.close()
            early = None
        if self._pool is not None:  # a feeder thread reads the remote stream into a queue, for the merged read
            remote = early or self._pool.open(path, info, plan)
            return self._start_thread(path, plan, remote.items, remote.close, nice=False)
        if self.queue_size:
            return early or self._start_decode(path, plan)
        return engine.decode_streams(path, plan, self.decode)

    def _events(self, streams: dict[int, Any], on_end: Callable[[int], None]) -> Iterator[tuple[int, str, Any]]:
        """The items' stream events: round-robin in this thread (inline decode), else in arrival order from the
        decode threads; `on_end(row)` runs as each stream ends, before its END event (it may add streams)."""
        if self._pool is None and not self.queue_size:
            return _ending(engine.interleave(streams), on_end)
        return self._merged(streams, on_end)

    def _merged(self, streams: dict[int, _Stream], on_end: Callable[[int], None]) -> Iterator[tuple[int, str, Any]]:
        """(row, kind, payload) from several threads' queues as they fill, (row, END, None) at each stream's end;
        a row the consumer removes from `streams` is not read further, one it adds is read from the next pass on.
        `on_end(row)` runs as a stream ends."""
        ended: set[int] = set()
        while live := [row for row in streams if row not in ended]:
            self._wake.clear()  # before the pass: a put after this sets it again, so no wake-up is missed
            got = False
            for row in live:
                s = streams.get(row)
                try:
                    item = s.queue.get_nowait() if s is not None else _DONE
                except queue.Empty:
                    continue
                got = True
                if item is not _DONE:
                    yield (row, *item)
                    continue
                ended.add(row)
                on_end(row)
                if s is not None:
                    yield row, engine.END, None
            if not got:
                self._wake.wait(0.5)

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

    def _open_ahead(self, prefetch: Hint) -> None:
        """Open the decodes of the named next items (one (path, features) or a list): on the decode actors, or in
        decode threads; close the other early decodes. A probe failure is left for the item's own call."""
        hints = [prefetch] if isinstance(prefetch, tuple) else list(prefetch or [])
        wanted = {str(p) for p, _ in hints}
        for p in [p for p in self._ahead if p not in wanted]:
            self._ahead.pop(p).add_done_callback(_close_opened)
        if self._pool is None and not self.queue_size:
            return
        for p, feats in hints:
            if p not in self._ahead:
                self._ahead[p] = self._opener.submit(self._open_early, p, list(feats))

    def _open_early(self, path: str, features: Sequence[str]) -> tuple[Any, Any] | None:
        """Opener thread: probe a next item and start its decode; None when the probe fails (its call reports it)."""
        info, failed = engine.probe_failure(path)
        if failed is not None:
            return None
        plan = engine.plan_streams([self.extractors[f] for f in features if f in self.extractors], info,
                                   self.decode.select)
        return info, (self._pool.open(path, info, plan) if self._pool is not None else self._start_decode(path, plan))

    def _start_decode(self, path: str, plan: engine.StreamPlan) -> "_Stream":
        """A decode thread (at a lower CPU priority) filling a bounded queue for `path`."""
        return self._start_thread(path, plan, lambda: engine.decode_streams(path, plan, self.decode), None, nice=True)

    def _start_thread(self, path: str, plan: engine.StreamPlan, source: Callable[[], Iterable[tuple[str, Any]]],
                      on_close: Callable[[], None] | None, nice: bool) -> "_Stream":
        """A thread moving `source()`'s items into a bounded queue (then the end marker)."""
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=max(2, self.queue_size))
        thread = threading.Thread(target=self._produce, args=(source, plan, q, stop, nice), daemon=True)
        thread.start()
        return _Stream(path, plan, q, stop, thread, on_close)

    def _produce(self, source: Callable[[], Iterable[tuple[str, Any]]], plan: engine.StreamPlan, q: queue.Queue,
                 stop: threading.Event, nice: bool) -> None:
        """Producer thread: frame batches, then audio chunks, then the end marker (errors in between)."""

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    self._wake.set()
                    return True
                except queue.Full:
                    continue
            return False

        if nice:
            _lower_priority()
        try:
            for item in source():
                if not put(item):
                    return
        except BaseException as e:  # not an Exception (e.g. SystemExit): every requested stream counts as failed
            for kind, wanted in (("frames_error", plan.frames), ("audio_error", plan.audio)):
                if wanted:
                    put((kind, e))
        put(_DONE)  # the consumer reads on after a stream's error, so the end marker always follows

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
    """One item's producer thread (a decode, or a remote stream's reader) and the bounded queue it fills."""

    path: str
    plan: engine.StreamPlan
    queue: queue.Queue
    stop: threading.Event
    thread: threading.Thread
    on_close: Callable[[], None] | None = None  # after the thread: e.g. cancel the remote decode

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue), wait for it, then release its source."""
        self.stop.set()
        self.thread.join(timeout=30)
        if self.on_close is not None:
            self.on_close()


def _ending(events: Iterator[tuple[int, str, Any]], on_end: Callable[[int], None]) -> Iterator[tuple[int, str, Any]]:
    """`events`, calling `on_end(row)` before each stream's END event."""
    for event in events:
        if event[1] == engine.END:
            on_end(event[0])
        yield event


def _close_opened(fut: Future[tuple[Any, Any] | None]) -> None:
    """Close a decode opened ahead for an item no longer named (a done-callback: never waits for the opener)."""
    try:
        opened = fut.result()
    except Exception:  # noqa: BLE001 - it never opened: nothing to close
        return
    if opened is not None:
        opened[1].close()


def _failed_outcome(features: Sequence[str], failed: engine.Failure | None) -> engine.ItemOutcome:
    """Every feature failed the same way (the probe failed)."""
    assert failed is not None
    return engine.ItemOutcome(failures=dict.fromkeys(features, failed), spent=dict.fromkeys(features, 0.0))


def spec_from_description(desc: Mapping[str, Any]) -> FeatureSpec:
    """The FeatureSpec inside one `ExtractWorker.describe()` entry."""
    return FeatureSpec.from_json(desc["spec"])
