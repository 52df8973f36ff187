"""The decode stage: CPU actors that decode items and stream their batches to the model workers.

With `--decode-workers N`, decoding leaves the model workers: N `DecodeWorker` actors (one CPU each, on any node)
run `extract.engine.decode_streams` and yield every frame batch / audio chunk as a Ray object (a streaming
generator), so a batch crosses nodes through Ray's object store and is read zero-copy on the same node. The model
worker opens a `RemoteDecode` per item: for its current item and, ahead of time, for the next items the dispatcher
names, so several decoders work for one model worker at once.

Backpressure: a stream holds at most `max_in_flight(...)` produced-but-unread objects (Ray's generator
backpressure), sized from a byte budget and the item's frame size, so in-flight bytes stay bounded per stream, and
the number of open streams per model worker is bounded by the dispatcher's lookahead.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from extract import engine

if TYPE_CHECKING:
    from extract.decode import MediaInfo

DEFAULT_INFLIGHT_BYTES = 64 << 20  # per open stream: decoded bytes produced ahead of the model worker


class DecodeWorker:
    """A decode actor: streams one item's decoded batches per call (a plain class; Ray wraps it)."""

    def __init__(self, threads: int = 1) -> None:
        """`threads`: FFmpeg decoder threads per stream (the actor holds about one CPU per concurrent stream)."""
        from extract import decode  # noqa: F401  (PyAV and the decoder load now, not inside the first item's stream)

        self.threads = int(threads)

    def stream(self, path: str, plan: engine.StreamPlan, opts: engine.DecodeOptions) -> Iterator[tuple[str, Any]]:
        """("frames", FrameBatch) ..., ("audio", samples) ...; a stream's error is an item, not an exception."""
        opts = engine.DecodeOptions(frame_rule=opts.frame_rule, batch_size=opts.batch_size, height=opts.height,
                                    threads=self.threads, select=opts.select)
        yield from engine.decode_streams(path, plan, opts)

    def pid(self) -> int:
        """The actor's process id (health checks)."""
        return os.getpid()


def max_in_flight(info: MediaInfo, opts: engine.DecodeOptions, budget: int = DEFAULT_INFLIGHT_BYTES) -> int:
    """Objects a stream may produce ahead of its reader: `budget` bytes of frame batches, at least 2."""
    w, h = info.width, info.height  # 0 when the probe could not tell
    if opts.height and h:
        w, h = max(1, round(w * opts.height / h)), opts.height
    batch_bytes = max(1, w * h * 3 * opts.batch_size)
    return max(2, budget // batch_bytes)


@dataclass
class RemoteDecode:
    """One item's decode running on a DecodeWorker, read in order through the object store."""

    path: str
    plan: engine.StreamPlan
    gen: Any  # ray ObjectRefGenerator
    done: bool = False  # every item was read

    def items(self) -> Iterator[tuple[str, Any]]:
        """The decoded items; a decoder that dies mid-stream fails the streams still open (decode_error)."""
        import ray

        try:
            for ref in self.gen:
                yield ray.get(ref)
            self.done = True
        except ray.exceptions.RayError as e:
            err = RuntimeError(f"the decode worker failed while decoding {self.path}: {engine.short_error(e)[:500]}")
            for kind, wanted in (("frames_error", self.plan.frames), ("audio_error", self.plan.audio)):
                if wanted:
                    yield kind, err

    def close(self) -> None:
        """Stop the producer (it may be blocked on backpressure) and release its objects.

        After the cancel request the remaining refs are read off (not their data): a producer the cancel could not
        interrupt then runs to its end instead of holding its decode actor's slot blocked on backpressure.
        """
        import ray

        if self.done:
            return
        try:
            ray.cancel(self.gen)
        except Exception:  # noqa: BLE001 - already finished or its actor is gone: nothing left to stop
            pass
        try:
            for _ in self.gen:
                pass
        except Exception:  # noqa: BLE001 - cancelled or its actor died: the stream is over either way
            pass


class DecoderPool:
    """The model worker's view of the decode actors: opens remote decodes, spreading them round-robin."""

    def __init__(self, handles: list[Any], opts: engine.DecodeOptions, start: int = 0,
                 budget: int = DEFAULT_INFLIGHT_BYTES) -> None:
        if not handles:
            raise ValueError("DecoderPool needs at least one decode worker handle")
        self.handles, self.opts, self.budget = list(handles), opts, int(budget)
        self._next = itertools.cycle(range(len(self.handles)))
        for _ in range(start % len(self.handles)):  # model workers start on different decoders
            next(self._next)

    def open(self, path: str, info: MediaInfo, plan: engine.StreamPlan) -> RemoteDecode:
        """Start decoding `path` on the next decode worker."""
        handle = self.handles[next(self._next)]
        gen = handle.stream.options(num_returns="streaming",
                                    _generator_backpressure_num_objects=max_in_flight(info, self.opts, self.budget)
                                    ).remote(path, plan, self.opts)
        return RemoteDecode(path, plan, gen)


def decode_actor_cpus(decode_workers: int, cluster_cpus: float) -> float:
    """Ray CPUs per decode actor: one each while they fit in half the cluster, less on small machines."""
    if decode_workers <= 0:
        return 0.0
    share = min(1.0, max(float(cluster_cpus), 1.0) / 2 / decode_workers)
    return max(0.0001, int(share * 10000) / 10000)
