"""The per-item engine: probe once, decode once, feed every extractor's session, finish each on its own.

`Extractor.extract_path` and the pipeline's workers run this same code. Guarantees:
- one decode of each stream per item, whatever the number of extractors;
- a video error fails only the features that consume frames, an audio error only those that consume audio;
- every requested feature ends with a row (OK / ABSENT) or a `Failure` (reason + message);
- frames on the decode grid that no extractor samples are not colour-converted or resized (`StreamPlan.keep`).
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from extract.sampling import DECODE_FPS
from store.schema import FeatureRows

if TYPE_CHECKING:
    from extract._api import Extractor, FrameStepExtractor, ItemSession
    from extract.decode import MediaInfo

log = logging.getLogger("tvr.extract")
STREAM_ERRORS = {"frames_error": "frames", "audio_error": "audio"}  # stream error kind -> the stream it ends


@dataclass(frozen=True)
class DecodeOptions:
    """How an item is decoded (everything here but `threads` changes frame values)."""

    frame_rule: str = "nearest"
    batch_size: int = 16  # frames per decoded batch
    height: int | None = None  # decode height (None: native)
    threads: int = 0  # FFmpeg decoder threads (0: FFmpeg decides)
    select: bool = True  # convert only the frames some extractor reads (False: every grid frame)


@dataclass(frozen=True)
class StreamPlan:
    """What to decode for one item: frames (only `keep`, None = all), audio."""

    frames: bool
    audio: bool
    keep: frozenset[int] | None = None


@dataclass
class Failure:
    """Why a feature of an item has no row: store reason, message, and the exception when there was one."""

    reason: str
    message: str
    error: BaseException | None = None


@dataclass
class ItemOutcome:
    """The result of one item: a row or a failure per feature, and seconds spent inside each extractor."""

    rows: dict[str, FeatureRows] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def row_or_raise(self, feature: str) -> FeatureRows:
        """The feature's row; its failure's exception (or a RuntimeError) when it failed."""
        if feature in self.rows:
            return self.rows[feature]
        fail = self.failures[feature]
        if fail.error is not None:
            raise fail.error
        raise RuntimeError(fail.message)


def short_error(exc: BaseException) -> str:
    """`Type: message` of an exception, one line."""
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def extractor_failure(exc: BaseException) -> Failure:
    """Failure for an exception raised inside an extractor (with a short traceback)."""
    return Failure("extractor_error", f"extractor_error: {short_error(exc)}\n{traceback.format_exc(limit=3)}", exc)


def decode_failure(exc: BaseException) -> Failure:
    """Failure for a stream's decode exception: truncated, or decode_error."""
    from extract import decode

    if isinstance(exc, decode.TruncatedMedia):
        return Failure("truncated", f"truncated: {exc}", exc)
    if isinstance(exc, decode.DecodeError):
        return Failure("decode_error", f"decode_error: {exc}", exc)
    return Failure("decode_error", f"decode_error: {short_error(exc)}", exc)


def plan_streams(extractors: Iterable[Extractor], info: MediaInfo, select: bool = True) -> StreamPlan:
    """The streams `extractors` consume from an item; a stream the file lacks is not decoded (ABSENT rows).

    With `select`, frames are limited to the union of the extractors' `frames_needed(info)` (one that needs every
    frame, like I3D, or cannot say, keeps them all).
    """
    exs = list(extractors)
    frame_exs = [ex for ex in exs if ex.needs_frames]
    frames = bool(frame_exs) and info.has_video
    audio = any(ex.needs_audio for ex in exs) and info.has_audio
    keep: set[int] | None = set() if (frames and select) else None
    for ex in frame_exs if keep is not None else ():
        try:
            need = ex.frames_needed(info)
        except Exception:  # noqa: BLE001 - its session start reports the problem; decode everything meanwhile
            need = None
        if need is None:
            keep = None
            break
        keep.update(int(k) for k in np.asarray(need).ravel())
    return StreamPlan(frames, audio, None if keep is None else frozenset(keep))


def decode_streams(path: str, plan: StreamPlan, opts: DecodeOptions) -> Iterator[tuple[str, Any]]:
    """("frames", FrameBatch)..., then ("audio", samples)...; a stream's failure is yielded as
    ("frames_error" | "audio_error", exception) after its readable part, and the other stream is still decoded."""
    from extract import decode

    if plan.frames:
        try:
            for batch in decode.iter_frames(path, fps=DECODE_FPS, batch_size=opts.batch_size, height=opts.height,
                                            frame_rule=opts.frame_rule, threads=opts.threads, keep=plan.keep):
                yield "frames", batch
        except Exception as e:
            yield "frames_error", e
    if plan.audio:
        try:
            for chunk in decode.iter_audio(path):
                yield "audio", chunk
        except Exception as e:
            yield "audio_error", e


class ItemRun:
    """The sessions of one item: started from its MediaInfo, fed stream items, finished into an ItemOutcome."""

    def __init__(self, extractors: Mapping[str, Extractor], info: MediaInfo, features: Sequence[str]) -> None:
        """Start a session per feature; one that cannot start fails alone."""
        self.extractors, self.info = extractors, info
        self.outcome = ItemOutcome(spent=dict.fromkeys(features, 0.0))
        self.sessions: dict[str, ItemSession] = {}
        self.stream_failures: dict[str, Failure] = {}  # "frames" | "audio" -> the stream's decode failure
        for f in features:
            try:
                t = time.perf_counter()
                self.sessions[f] = extractors[f].start(info)
                self.outcome.spent[f] += time.perf_counter() - t
            except Exception as e:
                self.outcome.failures[f] = extractor_failure(e)

    def plan(self, select: bool = True) -> StreamPlan:
        """What the live sessions need decoded."""
        return plan_streams((self.extractors[f] for f in self.sessions), self.info, select)

    @property
    def live(self) -> bool:
        """Whether any session still takes input."""
        return bool(self.sessions)

    @property
    def waiting(self) -> bool:
        """Whether a session's model inputs still wait for a batch in a shared pool (finishing now would run that
        batch part-empty)."""
        return any(s.waiting for s in self.sessions.values())

    def feed(self, kind: str, payload: Any) -> None:
        """Hand one stream item to every session that consumes it; an extractor error ends only its session."""
        if kind in STREAM_ERRORS:
            self.stream_failures[STREAM_ERRORS[kind]] = decode_failure(payload)
            return
        for f in list(self.sessions):
            ex = self.extractors[f]
            if not (ex.needs_frames if kind == "frames" else ex.needs_audio):
                continue
            try:
                t = time.perf_counter()
                if kind == "frames":
                    self.sessions[f].add_frames(payload)
                else:
                    self.sessions[f].add_audio(payload)
                self.outcome.spent[f] += time.perf_counter() - t
            except Exception as e:
                self.sessions.pop(f).close()
                self.outcome.failures[f] = extractor_failure(e)

    def finish(self) -> ItemOutcome:
        """Finish every live session, unless a stream it consumes failed to decode."""
        for f, sess in self.sessions.items():
            failed = self._stream_failure(f)
            if failed is not None:
                sess.close()
                self.outcome.failures[f] = failed
                continue
            try:
                t = time.perf_counter()
                self.outcome.rows[f] = sess.finish()
                self.outcome.spent[f] += time.perf_counter() - t
            except Exception as e:
                self.outcome.failures[f] = extractor_failure(e)
        self.sessions = {}
        return self.outcome

    def abandon(self) -> None:
        """Close every live session without a result (the item's run stopped early)."""
        for sess in self.sessions.values():
            sess.close()
        self.sessions = {}

    def _stream_failure(self, feature: str) -> Failure | None:
        """The decode failure of a stream `feature` consumes (a frame error never fails audio features)."""
        ex = self.extractors[feature]
        if ex.needs_frames and "frames" in self.stream_failures:
            return self.stream_failures["frames"]
        if ex.needs_audio and "audio" in self.stream_failures:
            return self.stream_failures["audio"]
        return None


def lower_attr(owner: object, attr: str) -> Callable[[int], None]:
    """An `on_halve` for `run_halving`: lowers `owner.<attr>` (a batch size) to at most the halved size."""

    def lower(half: int) -> None:
        setattr(owner, attr, max(1, min(int(getattr(owner, attr)), half)))

    return lower


def run_halving(run: Callable[[Any], Any], x: Any, on_halve: Callable[[int], None], who: str) -> Any:
    """`run(x)`; a CUDA out-of-memory error halves `x` (anything sliceable) and retries each half (down to one
    input), calling `on_halve(half)` so later batches start at a size that fits, instead of failing the item.
    The halves' outputs are joined (numpy arrays or torch tensors)."""
    import torch

    try:
        return run(x)
    except torch.cuda.OutOfMemoryError:
        if len(x) <= 1:
            raise
    # retried outside the except block, so the failed attempt's traceback (and its tensors) are released first
    torch.cuda.empty_cache()  # a no-op unless CUDA was initialised (the tests' simulated OOMs run on CPU)
    half = len(x) // 2
    on_halve(half)
    log.warning("%s: CUDA out of memory on a batch of %d; retrying as %d + %d", who, len(x), half, len(x) - half)
    a, b = run_halving(run, x[:half], on_halve, who), run_halving(run, x[half:], on_halve, who)
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else np.concatenate([a, b])


def infer_halving(ex: FrameStepExtractor, x: Any) -> np.ndarray:
    """`ex.infer(x)` under `run_halving`, lowering `ex.batch_size` when a batch does not fit."""
    return run_halving(ex.infer, x, lower_attr(ex, "batch_size"), ex.name)


class PoolMember(Protocol):
    """A session whose model inputs wait in a `BatchPool`: receives its outputs, or the error of its inputs."""

    def deliver(self, key: int, row: np.ndarray) -> None:
        """The model output for the input queued under `key`."""

    def fail(self, error: BaseException) -> None:
        """The model failed on this session's inputs (also when run alone)."""


class BatchPool:
    """The model inputs of every live session of one extractor's model, run together in batches.

    Several items' inputs (frame-step frames, I3D stacks, VGGish examples) fill one batch (cross-item batching,
    when a worker has several items in flight); each output goes back to its session under its key, so results do
    not depend on batch composition for row-wise models. A failure of a batch holding several sessions' inputs is
    retried per session: only the sessions whose own inputs fail get the error. Used from one thread (the
    worker's model thread); a session's `finish` flushes the pool (`run_group` finishes an ended item once other
    items have filled its last batch, or when none is left to fill it).

    With `overlap` (an accelerator), each batch's `run` goes to a model thread and the calling thread returns to
    decoding and preprocessing the next inputs, the way CUDA's asynchronous launches let the host work ahead: the
    device is handed the next batch as soon as it finishes one. At most `OVERLAP_DEPTH` batches are out (bounded
    memory); outputs and errors are still delivered in the calling thread, in order.
    """

    OVERLAP_DEPTH = 2  # batches handed to the model thread and not yet delivered: one running, one waiting

    def __init__(self, name: str, size: Callable[[], int], run: Callable[[list[Any]], Sequence[Any]],
                 overlap: bool = False) -> None:
        """`name` for messages; `size()`: the current batch size (it drops after a CUDA OOM); `run(inputs)`:
        a list of single-item inputs -> one output row per input (OOM halving is `run`'s own); `overlap`: run
        batches on a model thread while the caller prepares the next ones."""
        self.name, self.size, self.run = name, size, run
        self.inputs: list[Any] = []
        self.owners: list[PoolMember] = []
        self.keys: list[int] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"tvr-model-{name}") if overlap else None
        self._out: deque[tuple[Future[Sequence[Any]], list[Any], list[int], list[PoolMember]]] = deque()

    def __len__(self) -> int:
        return len(self.inputs)

    def add(self, owner: PoolMember, keys: Sequence[int], inputs: Sequence[Any]) -> None:
        """Queue single-item inputs; run every full batch."""
        self.inputs.extend(inputs)
        self.keys.extend(int(k) for k in keys)
        self.owners.extend([owner] * len(keys))
        while len(self.inputs) >= max(1, int(self.size())):
            self._run(max(1, int(self.size())))

    def flush(self) -> None:
        """Run everything queued, in batches of at most the batch size, and deliver every output."""
        while self.inputs:
            self._run(min(len(self.inputs), max(1, int(self.size()))))
        while self._out:
            self._collect()

    def holds(self, owner: PoolMember) -> bool:
        """Whether inputs of `owner` wait for a batch (not yet handed to the model)."""
        return any(o is owner for o in self.owners)

    def settle(self, owner: PoolMember) -> None:
        """Deliver every output of `owner`: when some of its inputs still wait, everything queued runs now (a
        part-empty batch); else only the batches out on the model thread up to its last are waited for."""
        if self.holds(owner):
            self.flush()
        while any(o is owner for _, _, _, owners in self._out for o in owners):
            self._collect()

    def discard(self, owner: PoolMember) -> None:
        """Drop an abandoned session's queued inputs (its item failed elsewhere)."""
        keep = [i for i, o in enumerate(self.owners) if o is not owner]
        if len(keep) != len(self.owners):
            self.inputs = [self.inputs[i] for i in keep]
            self.keys = [self.keys[i] for i in keep]
            self.owners = [self.owners[i] for i in keep]

    def _run(self, n: int) -> None:
        """Run the first `n` queued inputs (on the model thread with `overlap`)."""
        xs, keys, owners = self.inputs[:n], self.keys[:n], self.owners[:n]
        del self.inputs[:n], self.keys[:n], self.owners[:n]
        if self._thread is None:
            self._deliver(xs, keys, owners, lambda: self.run(xs))
            return
        self._out.append((self._thread.submit(self.run, xs), xs, keys, owners))
        while len(self._out) >= self.OVERLAP_DEPTH:
            self._collect()

    def _collect(self) -> None:
        """Wait for the oldest batch on the model thread and deliver it."""
        fut, xs, keys, owners = self._out.popleft()
        self._deliver(xs, keys, owners, fut.result)

    def _deliver(self, xs: list[Any], keys: list[int], owners: list[PoolMember],
                 result: Callable[[], Sequence[Any]]) -> None:
        """Outputs of one batch to their sessions; a failure is retried per session when the batch is mixed."""
        groups: dict[int, list[int]] = {}
        for i, o in enumerate(owners):
            groups.setdefault(id(o), []).append(i)
        try:
            out = result()
        except Exception as e:  # noqa: BLE001 - attributed to the sessions whose inputs fail
            if len(groups) == 1:
                owners[0].fail(e)
                return
            log.warning("%s: a batch of %d items' inputs failed (%s); retrying each item alone",
                        self.name, len(groups), short_error(e))
            for idx in groups.values():
                self._run_alone([xs[i] for i in idx], [keys[i] for i in idx], owners[idx[0]])
            return
        for k, o, row in zip(keys, owners, out):
            o.deliver(k, row)

    def _run_alone(self, xs: list[Any], keys: list[int], owner: PoolMember) -> None:
        """One session's inputs on their own (after a mixed batch failed)."""
        try:
            out = self.run(xs)
        except Exception as e:  # noqa: BLE001 - this session's own inputs fail: its item's feature fails
            owner.fail(e)
            return
        for k, row in zip(keys, out):
            owner.deliver(k, row)


def _infer_stacked(ex: FrameStepExtractor, xs: list[Any]) -> np.ndarray:
    """A frame-step pool's run: single-frame inputs -> one batch tensor -> `ex.infer` under OOM halving."""
    import torch

    return infer_halving(ex, torch.stack(xs))


def shared_pool(owner: object, make: Callable[[], BatchPool]) -> BatchPool:
    """`owner`'s (an extractor's) one pool, made on first use, so every session of `owner` batches together."""
    pool = vars(owner).get("_batch_pool")
    if pool is None:
        pool = vars(owner)["_batch_pool"] = make()
    return pool


def batch_pool(ex: FrameStepExtractor) -> BatchPool:
    """A frame-step extractor's shared pool: its `batch_size`, `infer` on stacked frame inputs."""
    return shared_pool(ex, lambda: BatchPool(ex.name, lambda: ex.batch_size, partial(_infer_stacked, ex),
                                             overlap=ex.overlaps_host))


def probe_failure(path: str | os.PathLike[str]) -> tuple[MediaInfo | None, Failure | None]:
    """(info, None), or (None, the probe's failure for every feature)."""
    from extract import decode

    try:
        return decode.probe(path), None
    except decode.DecodeError as e:
        return None, Failure("decode_error", f"decode_error: {e}", e)


def run_item(extractors: Mapping[str, Extractor], path: str | os.PathLike[str], features: Sequence[str],
             opts: DecodeOptions = DecodeOptions(), info: MediaInfo | None = None,
             stream: Iterable[tuple[str, Any]] | None = None) -> ItemOutcome:
    """Probe (unless `info` is given), decode once (or read `stream`, e.g. a decode thread's queue), feed, finish."""
    if info is None:
        info, failed = probe_failure(path)
        if failed is not None:
            return ItemOutcome(failures=dict.fromkeys(features, failed), spent=dict.fromkeys(features, 0.0))
    run = ItemRun(extractors, info, features)
    if stream is None:
        stream = decode_streams(str(path), run.plan(opts.select), opts) if run.live else ()
    for kind, payload in stream:
        run.feed(kind, payload)
        if not run.live:
            break
    return run.finish()


END = "end"  # event kind: an item's stream is fully read


def run_group(runs: dict[Any, ItemRun], events: Iterable[tuple[Any, str, Any]]) -> Iterator[tuple[Any, ItemOutcome]]:
    """Several items in flight at once: feed each (key, kind, payload) event to its item's run; yield (key,
    outcome) as each item ends. Items whose stream never ends are finished when `events` is exhausted; `runs` is
    emptied as items end.

    Their pooled sessions share each extractor's `BatchPool`, so one model batch holds inputs of several items.
    An item whose stream ended (an (key, END, None) event) while its last inputs wait in a pool is finished once
    other items' inputs have filled and run that batch, or at once when no other item is still streaming: a
    model batch runs part-empty only when nothing else could fill it.
    """
    ending: dict[Any, ItemRun] = {}  # stream ended, inputs still queued in a pool that other items are filling
    try:
        for key, kind, payload in events:
            run = runs.get(key)
            if run is not None:  # None: already ended (its sessions were done before its stream ended)
                if kind != END:
                    run.feed(kind, payload)
                if kind == END or not run.live:
                    ending[key] = runs.pop(key)
            for k in [k for k, r in ending.items() if not (runs and r.waiting)]:
                yield k, ending.pop(k).finish()
        while ending or runs:
            key = next(iter(ending or runs))
            yield key, (ending.pop(key) if key in ending else runs.pop(key)).finish()
    finally:
        for run in ending.values():  # only when the caller stopped early: their queued model inputs are dropped
            run.abandon()


def interleave(streams: dict[Any, Iterator[tuple[str, Any]]]) -> Iterator[tuple[Any, str, Any]]:
    """Round-robin over items' streams in the calling thread: (key, kind, payload) events, (key, END, None) at each
    stream's end. A key the consumer removes from `streams` is not read further."""
    while streams:
        for key in list(streams):
            it = streams.get(key)
            if it is None:
                continue
            try:
                kind, payload = next(it)
            except StopIteration:
                streams.pop(key, None)
                yield key, END, None
                continue
            yield key, kind, payload
