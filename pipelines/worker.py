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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from extract.sampling import DECODE_FPS
from store.schema import FeatureSpec, Status

_DONE = object()
_ERRORS = {"frames_error": "frames", "audio_error": "audio"}  # decode-stream error item -> the stream it ends


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
        frame_rule: str = "nearest",
        batch_size: int = 16,
        decode_height: int | None = None,
        queue_size: int = 4,
        decode_threads: int = 0,
    ) -> None:
        """`threads`: torch intra-op threads; `decode_threads`: FFmpeg decoder threads (0: FFmpeg decides).

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
        self._stores: dict[str, Any] = {}
        self._prefetched: _Stream | None = None  # the next item's decode, started early

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

        `prefetch` = (path, features) of this worker's next item: its decoding starts as soon as this item's
        stream is decoded, so it overlaps this item's remaining compute (models that run at `finish`) and writes.
        """
        t0 = time.perf_counter()
        store = self._store(store_url)
        results: dict[str, tuple[int, str]] = {}
        spent: dict[str, float] = dict.fromkeys(features, 0.0)  # model seconds per feature (profiling)

        def fail(feature: str, reason: str, message: str) -> None:
            store.write_failed(feature, row, reason, message[:2000])
            results[feature] = (int(Status.FAILED), reason)

        from extract import decode

        try:
            info = decode.probe(path)
        except decode.DecodeError as e:
            for f in features:
                fail(f, "decode_error", f"decode_error: {e}")
            if prefetch is not None:
                self._prefetch(decode, *prefetch)
            return self._summary(row, results, t0, spent)

        sessions: dict[str, Any] = {}
        for f in features:
            try:
                t = time.perf_counter()
                sessions[f] = self.extractors[f].start(info)
                spent[f] += time.perf_counter() - t
            except Exception as e:  # one extractor failing leaves the others running
                fail(f, "extractor_error", f"extractor_error: {_short(e)}\n{traceback.format_exc(limit=3)}")

        want_frames, want_audio = self._wants(list(sessions), info)
        failures: dict[str, tuple[str, str]] = {}  # stream ("frames" | "audio") -> (reason, message)
        live: _Stream | None = None
        if self.queue_size:
            live = self._take_prefetched(path, want_frames, want_audio)
            live = live or self._start_decode(decode, path, want_frames, want_audio)
            stream = self._drain(live.queue)
        else:
            stream = self._decode_inline(decode, path, want_frames, want_audio)
        try:
            for kind, payload in stream:
                if kind in _ERRORS:  # one stream failed: the other one still feeds its extractors
                    failures[_ERRORS[kind]] = _decode_failure(decode, payload)
                    continue
                for f in list(sessions):
                    ex = self.extractors[f]
                    if kind == "frames" and not getattr(ex, "needs_frames", True):
                        continue
                    if kind == "audio" and not getattr(ex, "needs_audio", False):
                        continue
                    try:
                        t = time.perf_counter()
                        if kind == "frames":
                            sessions[f].add_frames(payload)
                        else:
                            sessions[f].add_audio(payload)
                        spent[f] += time.perf_counter() - t
                    except Exception as e:
                        del sessions[f]
                        fail(f, "extractor_error", f"extractor_error: {_short(e)}\n{traceback.format_exc(limit=3)}")
                if not sessions:
                    break
        finally:
            if live is not None:
                live.close()
        if prefetch is not None and self.queue_size:
            self._prefetch(decode, *prefetch)

        for f, sess in sessions.items():
            failure = self._stream_failure(f, failures)
            if failure is not None:
                fail(f, *failure)
                continue
            try:
                t = time.perf_counter()
                result = sess.finish()
                spent[f] += time.perf_counter() - t
            except Exception as e:
                fail(f, "extractor_error", f"extractor_error: {_short(e)}\n{traceback.format_exc(limit=3)}")
                continue
            try:
                store.write(f, row, result)
            except Exception as e:  # a malformed result must not take the item's other features down
                fail(f, "write_error", f"write_error: {_short(e)}")
                continue
            results[f] = (int(result.status), result.reason)
        return self._summary(row, results, t0, spent)

    def _wants(self, features: Sequence[str], info: Any) -> tuple[bool, bool]:
        """(decode frames?, decode audio?) for `features` of an item described by `info`.

        A stream the file lacks is not decoded: its extractors' sessions finish ABSENT (no_video / no_audio),
        as in `Extractor.extract_path`.
        """
        frames = any(getattr(self.extractors[f], "needs_frames", True) for f in features)
        audio = any(getattr(self.extractors[f], "needs_audio", False) for f in features)
        return (frames and bool(getattr(info, "has_video", True)),
                audio and bool(getattr(info, "has_audio", True)))

    def _stream_failure(self, feature: str, failures: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
        """The decode failure of a stream `feature` consumes, if any (a frame error never fails audio features)."""
        ex = self.extractors[feature]
        if getattr(ex, "needs_frames", True) and "frames" in failures:
            return failures["frames"]
        if getattr(ex, "needs_audio", False) and "audio" in failures:
            return failures["audio"]
        return None

    def _start_decode(self, decode: Any, path: str, frames: bool, audio: bool) -> "_Stream":
        """A decode thread filling a bounded queue for `path`."""
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=max(1, self.queue_size))
        thread = threading.Thread(target=self._decode_into, args=(decode, path, frames, audio, q, stop), daemon=True)
        thread.start()
        return _Stream(path, frames, audio, q, stop, thread)

    def _prefetch(self, decode: Any, path: str, features: Sequence[str]) -> None:
        """Start decoding the next item; a probe failure is left for its own `process` call to record."""
        if self._prefetched is not None:
            self._prefetched.close()
            self._prefetched = None
        try:
            info = decode.probe(path)
        except Exception:  # noqa: BLE001 - process() probes again and records the reason
            return
        frames, audio = self._wants([f for f in features if f in self.extractors], info)
        self._prefetched = self._start_decode(decode, path, frames, audio)

    def _take_prefetched(self, path: str, frames: bool, audio: bool) -> "_Stream | None":
        """The prefetched stream when it is this item's, decoding the same streams; otherwise drop it."""
        pre, self._prefetched = self._prefetched, None
        if pre is not None and (pre.path, pre.frames, pre.audio) == (path, frames, audio):
            return pre
        if pre is not None:
            pre.close()
        return None

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

        _lower_priority()
        try:
            for item in self._decode_inline(decode, path, frames, audio):
                if not put(item):
                    return
        except BaseException as e:  # not an Exception (e.g. SystemExit): every requested stream counts as failed
            for kind, wanted in (("frames_error", frames), ("audio_error", audio)):
                if wanted:
                    put((kind, e))
        put(_DONE)  # the consumer reads on after a stream's error, so the end marker always follows

    def _decode_inline(self, decode: Any, path: str, frames: bool, audio: bool) -> Iterator[tuple[str, Any]]:
        """Frame batches, then audio chunks (inline, or inside the producer thread).

        Each stream is decoded on its own: a failure is yielded as ("frames_error" | "audio_error", exception)
        after that stream's readable part, and the other stream is still decoded.
        """
        if frames:
            try:
                for batch in decode.iter_frames(path, fps=DECODE_FPS, batch_size=self.batch_size, height=self.height,
                                                frame_rule=self.frame_rule, threads=self.decode_threads):
                    yield "frames", batch
            except Exception as e:
                yield "frames_error", e
        if audio:
            try:
                for chunk in decode.iter_audio(path):
                    yield "audio", chunk
            except Exception as e:
                yield "audio_error", e

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
    frames: bool
    audio: bool
    queue: queue.Queue
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and wait for it."""
        self.stop.set()
        self.thread.join(timeout=30)


def _decode_failure(decode: Any, exc: BaseException) -> tuple[str, str]:
    """(reason, message) for a stream's decode exception: truncated, or decode_error."""
    if isinstance(exc, decode.TruncatedMedia):
        return "truncated", f"truncated: {exc}"
    if isinstance(exc, decode.DecodeError):
        return "decode_error", f"decode_error: {exc}"
    return "decode_error", f"decode_error: {_short(exc)}"


def spec_from_description(desc: Mapping[str, Any]) -> FeatureSpec:
    """The FeatureSpec inside one `ExtractWorker.describe()` entry."""
    return FeatureSpec.from_json(desc["spec"])
