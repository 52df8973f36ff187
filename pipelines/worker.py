"""The extraction worker: holds models once, decodes each item once, feeds every extractor, writes its rows.

`ExtractWorker` is a plain class (testable without Ray); `pipelines.run` wraps it with `ray.remote`. Decoding runs
in a thread that fills a bounded queue while the calling thread runs the models, so decode overlaps compute.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

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


def _short(exc: BaseException) -> str:
    """`Type: message` of an exception, one line."""
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
        fps: float = 25.0,
        batch_size: int = 16,
        decode_height: int | None = None,
        queue_size: int = 4,
    ) -> None:
        import torch

        import extract  # noqa: F401  (registers the built-in extractors)
        from extract import _registry

        torch.set_num_threads(max(1, int(threads)))
        import_plugins(plugins)
        kw = dict(extractor_kwargs or {})
        opts = extractor_options or {}
        self.extractors = {f: _registry.create_extractor(f, **kw, **dict(opts.get(f, {}))) for f in features}
        self.fps, self.batch_size, self.height, self.queue_size = fps, batch_size, decode_height, queue_size
        self._stores: dict[str, Any] = {}

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
    def process(self, store_url: str, row: int, path: str, features: Sequence[str]) -> dict[str, Any]:
        """Extract `features` for item `row` from `path`, write each row (status last); return a small summary."""
        t0 = time.perf_counter()
        store = self._store(store_url)
        results: dict[str, tuple[int, str]] = {}

        def fail(feature: str, reason: str, message: str) -> None:
            store.write_failed(feature, row, reason, message[:2000])
            results[feature] = (int(Status.FAILED), reason)

        from extract import decode

        try:
            info = decode.probe(path)
        except decode.DecodeError as e:
            for f in features:
                fail(f, "decode_error", f"decode_error: {e}")
            return self._summary(row, results, t0)

        sessions: dict[str, Any] = {}
        for f in features:
            try:
                sessions[f] = self.extractors[f].start(info)
            except Exception as e:  # one extractor failing leaves the others running
                fail(f, "extractor_error", f"extractor_error: {_short(e)}\n{traceback.format_exc(limit=3)}")

        want_frames = any(getattr(self.extractors[f], "needs_frames", True) for f in sessions)
        want_audio = any(getattr(self.extractors[f], "needs_audio", False) for f in sessions) and bool(
            getattr(info, "has_audio", True)
        )
        decode_failure: tuple[str, str] | None = None
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=max(1, self.queue_size))
        producer = threading.Thread(
            target=self._decode_into, args=(decode, path, want_frames, want_audio, q, stop), daemon=True
        )
        stream = self._drain(q) if self.queue_size else self._decode_inline(decode, path, want_frames, want_audio)
        if self.queue_size:
            producer.start()
        try:
            for kind, payload in stream:
                if kind == "error":
                    exc = payload
                    if isinstance(exc, decode.TruncatedMedia):
                        decode_failure = ("truncated", f"truncated: {exc}")
                    elif isinstance(exc, decode.DecodeError):
                        decode_failure = ("decode_error", f"decode_error: {exc}")
                    else:
                        decode_failure = ("decode_error", f"decode_error: {_short(exc)}")
                    break
                for f in list(sessions):
                    ex = self.extractors[f]
                    if kind == "frames" and not getattr(ex, "needs_frames", True):
                        continue
                    if kind == "audio" and not getattr(ex, "needs_audio", False):
                        continue
                    try:
                        if kind == "frames":
                            sessions[f].add_frames(payload)
                        else:
                            sessions[f].add_audio(payload)
                    except Exception as e:
                        del sessions[f]
                        fail(f, "extractor_error", f"extractor_error: {_short(e)}\n{traceback.format_exc(limit=3)}")
                if not sessions:
                    break
        finally:
            stop.set()
            if self.queue_size:
                producer.join(timeout=30)

        for f, sess in sessions.items():
            if decode_failure is not None:
                fail(f, *decode_failure)
                continue
            try:
                result = sess.finish()
            except Exception as e:
                fail(f, "extractor_error", f"extractor_error: {_short(e)}\n{traceback.format_exc(limit=3)}")
                continue
            try:
                store.write(f, row, result)
            except Exception as e:  # a malformed result must not take the item's other features down
                fail(f, "write_error", f"write_error: {_short(e)}")
                continue
            results[f] = (int(result.status), result.reason)
        return self._summary(row, results, t0)

    def _decode_into(
        self, decode: Any, path: str, frames: bool, audio: bool, q: queue.Queue, stop: threading.Event
    ) -> None:
        """Producer thread: frame batches, then audio chunks, then the end marker (or the error)."""

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            if frames:
                for batch in decode.iter_frames(
                    path, fps=self.fps, batch_size=self.batch_size, height=self.height
                ):
                    if not put(("frames", batch)):
                        return
            if audio:
                for chunk in decode.iter_audio(path):
                    if not put(("audio", chunk)):
                        return
        except BaseException as e:  # handed to the consumer, which records it per feature
            put(("error", e))
            return
        put(_DONE)

    def _decode_inline(self, decode: Any, path: str, frames: bool, audio: bool) -> Iterator[tuple[str, Any]]:
        """Decode in the calling thread (queue_size=0): frame batches, then audio chunks, or the error."""
        try:
            if frames:
                for batch in decode.iter_frames(path, fps=self.fps, batch_size=self.batch_size, height=self.height):
                    yield "frames", batch
            if audio:
                for chunk in decode.iter_audio(path):
                    yield "audio", chunk
        except Exception as e:
            yield "error", e

    @staticmethod
    def _drain(q: queue.Queue) -> Iterator[tuple[str, Any]]:
        """Items from the decode queue until the end marker."""
        while True:
            item = q.get()
            if item is _DONE:
                return
            yield item

    @staticmethod
    def _summary(row: int, results: dict[str, tuple[int, str]], t0: float) -> dict[str, Any]:
        """What goes back to the driver: statuses and reasons only, never arrays."""
        return {"row": row, "results": results, "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    # ------------------------------------------------------------- captions
    def captions(self, store_url: str, feature: str, start: int, texts: Sequence[str]) -> dict[str, Any]:
        """Encode caption rows [start, start+len(texts)) and write them as whole chunks."""
        t0 = time.perf_counter()
        store = self._store(store_url)
        try:
            rows = self.extractors[feature].encode_captions(list(texts))
            if len(rows) != len(texts):
                raise ValueError(f"encode_captions returned {len(rows)} rows for {len(texts)} captions")
            store.write_block(feature, start, rows)
            statuses = [(int(r.status), r.reason) for r in rows]
        except Exception as e:
            msg = f"extractor_error: {_short(e)}"
            for r in range(start, start + len(texts), store.spec(feature).chunk_rows):
                store.write_failed(feature, r, "extractor_error", msg)
            statuses = [(int(Status.FAILED), "extractor_error")] * len(texts)
        return {"feature": feature, "start": start, "results": statuses, "seconds": time.perf_counter() - t0}


def spec_from_description(desc: Mapping[str, Any]) -> FeatureSpec:
    """The FeatureSpec inside one `ExtractWorker.describe()` entry."""
    return FeatureSpec.from_json(desc["spec"])
