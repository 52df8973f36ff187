"""Cross-item batching for I3D (rgb, flow) stacks and VGGish examples: several in-flight items share one model batch
through the extractor's BatchPool, outputs go back per item, a failure stays with its item, a CUDA OOM still halves."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch

from extract import engine
from extract.decode import MediaInfo
from extract.i3d import I3DFlow, I3DRgb, _I3DExtractor
from extract.raft_flow import center_crop
from extract.vggish import VGGishExtractor
from store.schema import FeatureRows, Status
from tests._extractors import Batch, oom_above

SR = 16000
ITEMS = ("a", "b", "c")


def _fake_i3d(stacks: list[Any]) -> np.ndarray:
    """An exact stand-in for the I3D forward: a stack's feature is its frames' first pixel values (its labels)."""
    out = np.zeros((len(stacks), 1024), np.float32)
    for i, st in enumerate(stacks):
        out[i, : st.shape[1]] = st[0, :, 0, 0].numpy()
    return out


@dataclass
class Case:
    """One pooled extractor under test: how to build it and each item's info and stream."""

    feature: str
    make: Callable[[], Any]
    info: Callable[[str], MediaInfo]
    stream: Callable[[str], list[tuple[str, Any]]]


def _i3d(real: bool = False) -> I3DRgb:
    ex = I3DRgb(random_init=True, seed=1, stack_size=9, step_size=9, stack_batch=4, device="cpu")
    if not real:
        ex.run_stacks = _fake_i3d  # type: ignore[method-assign]
    return ex


def _fake_flow(first: Any, second: Any) -> Any:
    """An exact stand-in for RAFT + flow scaling: the pair's two frames, cropped, as the 2 channels."""
    return center_crop(torch.cat([first[:, :1], second[:, :1]], dim=1), 224).float()


def _i3d_flow() -> I3DFlow:
    ex = I3DFlow(random_init=True, raft="raft_small.C_T_V2", num_flow_updates=2, stack_size=9, step_size=9,
                 stack_batch=4, device="cpu")
    ex.run_stacks, ex.make_items = _fake_i3d, _fake_flow  # type: ignore[method-assign]
    return ex


FRAMES = {"a": 30, "b": 20, "c": 40}  # 3, 2 and 4 stacks of 9 frames every 9


def _item_frames(key: str) -> np.ndarray:
    """Item `key`'s frame k shows the constant colour 60 * i + k (so a stack's content names its item)."""
    i, n = ITEMS.index(key), FRAMES[key]
    return np.broadcast_to((60 * i + np.arange(n)).astype(np.uint8)[:, None, None, None], (n, 48, 64, 3)).copy()


def _frame_stream(key: str) -> list[tuple[str, Any]]:
    frames, out = _item_frames(key), []
    for s in range(0, len(frames), 7):
        idx = np.arange(s, min(s + 7, len(frames)))
        out.append(("frames", Batch(frames[idx], idx / 25.0, idx)))
    return out


SECONDS = {"a": 3.0, "b": 2.0, "c": 4.2}  # 3, 2 and 4 examples of 0.96 s


def _audio(key: str) -> np.ndarray:
    t = np.arange(int(SECONDS[key] * SR)) / SR
    rng = np.random.default_rng(ITEMS.index(key))
    return (0.2 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 300 * (1 + ITEMS.index(key)) * t)).astype(
        np.float32)


def _audio_stream(key: str) -> list[tuple[str, Any]]:
    return [("audio", c) for c in np.array_split(_audio(key), 6)]


CASES = {
    "i3d_rgb": Case("i3d_rgb", _i3d, lambda k: MediaInfo(f"{k}.mkv", "video", FRAMES[k] / 25, True, False),
                    _frame_stream),
    "i3d_flow": Case("i3d_flow", _i3d_flow, lambda k: MediaInfo(f"{k}.mkv", "video", FRAMES[k] / 25, True, False),
                     _frame_stream),
    "vggish": Case("vggish", lambda: VGGishExtractor(random_init=True, seed=7, batch_size=4, dtype="float32",
                                                     device="cpu"),
                   lambda k: MediaInfo(f"{k}.mkv", "audio", SECONDS[k], False, True), _audio_stream),
}


def _pool(ex: Any) -> engine.BatchPool:
    return ex.stack_pool() if isinstance(ex, _I3DExtractor) else ex.example_pool()


def _record(ex: Any, batches: list[list[str]], poison: str = "", threads: list[int] | None = None) -> None:
    """Record which items' inputs each model batch of `ex`'s pool holds (and in `threads`, the thread that ran
    it); fail any batch holding `poison`'s."""
    owner: dict[int, str] = {}
    start = ex.start

    def tracked(info: MediaInfo) -> Any:
        session = start(info)
        queue = session.queue

        def tagged(keys: Any, inputs: Any) -> None:
            owner.update((id(x), info.path[0]) for x in inputs)
            queue(keys, inputs)

        session.queue = tagged
        return session

    pool = _pool(ex)
    run = pool.run

    def recorded(xs: list[Any]) -> Any:
        batches.append([owner[id(x)] for x in xs])
        (threads if threads is not None else []).append(threading.get_ident())
        if poison in batches[-1]:
            raise RuntimeError(f"scripted model failure on item {poison}")
        return run(xs)

    ex.start, pool.run = tracked, recorded


def _together(case: Case, ex: Any) -> dict[str, engine.ItemOutcome]:
    """Every item in flight at once (round-robin over their streams, as a worker with --items-in-flight 3)."""
    runs = {k: engine.ItemRun({case.feature: ex}, case.info(k), [case.feature]) for k in ITEMS}
    streams = {k: iter(case.stream(k)) for k in ITEMS}
    return dict(engine.run_group(runs, engine.interleave(streams)))


_ALONE: dict[Callable[[], Any], Any] = {}  # one untouched extractor per case (building one takes seconds)


def _alone(case: Case, key: str) -> FeatureRows:
    """The item extracted on its own (nothing else in flight), by an extractor built like the pooled one."""
    if case.make not in _ALONE:
        _ALONE[case.make] = case.make()
    ex = _ALONE[case.make]
    return engine.run_item({case.feature: ex}, f"{key}.mkv", [case.feature], info=case.info(key),
                           stream=case.stream(key)).row_or_raise(case.feature)


def _assert_rows_equal(got: FeatureRows, want: FeatureRows, exact: bool) -> None:
    assert got.status == want.status == Status.OK
    np.testing.assert_array_equal(got.times, want.times)
    if exact:
        np.testing.assert_array_equal(got.values, want.values)
    else:  # CPU conv/GEMM kernels sum in an order that depends on the batch size: float32 rounding only
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["cpu", "accelerator"])  # BatchPool model thread


def _make(case: Case, overlap: bool) -> Any:
    """The case's extractor; `overlap`: its pool runs batches on a model thread, as on a CUDA device."""
    ex = case.make()
    ex.overlaps_host = overlap
    return ex


@OVERLAP
@pytest.mark.parametrize("name", CASES)
def test_several_items_share_model_batches_and_get_their_own_outputs(name: str, overlap: bool) -> None:
    case, batches, threads = CASES[name], [], []
    ex = _make(case, overlap)
    _record(ex, batches, threads=threads)
    out = _together(case, ex)
    assert any(len(set(b)) >= 2 for b in batches), batches  # model batches held inputs of several items
    assert (threading.get_ident() not in threads) if overlap else set(threads) == {threading.get_ident()}
    assert max(len(b) for b in batches) == 4 and len(_pool(ex)) == 0
    for k in ITEMS:
        _assert_rows_equal(out[k].row_or_raise(case.feature), _alone(case, k), exact=name != "vggish")
    assert sum(len(b) for b in batches) == sum(len(out[k].rows[case.feature].values) for k in ITEMS)


@OVERLAP
@pytest.mark.parametrize("name", CASES)
def test_a_model_failure_on_one_items_inputs_fails_only_that_item(name: str, overlap: bool) -> None:
    case, batches = CASES[name], []
    ex = _make(case, overlap)
    _record(ex, batches, poison="b")
    out = _together(case, ex)
    fail = out["b"].failures[case.feature]
    assert fail.reason == "extractor_error" and "scripted model failure on item b" in fail.message
    assert any("b" in b and len(set(b)) >= 2 for b in batches), batches  # the failed batch was mixed: retried
    for k in ("a", "c"):
        _assert_rows_equal(out[k].row_or_raise(case.feature), _alone(case, k), exact=name != "vggish")
    assert len(_pool(ex)) == 0  # nothing of the failed item is left queued


@OVERLAP
@pytest.mark.parametrize("name", CASES)
def test_cuda_oom_on_a_mixed_batch_halves_it_and_still_splits_back(name: str, overlap: bool) -> None:
    case, seen = CASES[name], []
    ex = _make(case, overlap)
    if name != "vggish":
        ex.run_stacks = oom_above(1, ex.run_stacks, seen)
    else:
        ex.embed = oom_above(1, ex.embed, seen)
    out = _together(case, ex)
    assert seen[:3] == [4, 2, 1]  # a full mixed batch of 4, halved down to single inputs, which fit
    assert (ex.batch_size if name == "vggish" else ex.stack_batch) == 1  # later batches start at the size that fit
    for k in ITEMS:
        _assert_rows_equal(out[k].row_or_raise(case.feature), _alone(case, k), exact=name != "vggish")


@OVERLAP
def test_an_ended_item_waits_for_other_items_to_fill_its_last_batch(overlap: bool) -> None:
    case, batches = CASES["i3d_rgb"], []
    ex = _make(case, overlap)
    _record(ex, batches)
    runs = {k: engine.ItemRun({case.feature: ex}, case.info(k), [case.feature]) for k in ("b", "c")}
    c = case.stream("c")
    events = [("b", kind, p) for kind, p in case.stream("b")] + [("c", kind, p) for kind, p in c[:2]]
    fed = iter([*events, ("b", engine.END, None), ("c", *c[2]), *[("c", *e) for e in c[3:]], ("c", engine.END, None)])
    group = engine.run_group(runs, fed)
    key, outcome = next(group)  # b's stream ended with 2 stacks and c's 1 queued: b waits for c's next stack
    assert key == "b" and outcome.rows[case.feature].status == Status.OK and "c" in runs
    assert batches == [["b", "b", "c", "c"]]  # no part-empty batch while c was still streaming
    _assert_rows_equal(outcome.rows[case.feature], _alone(case, "b"), exact=True)
    key, outcome = next(group)
    assert key == "c" and batches[1:] == [["c", "c"]] and not runs and len(_pool(ex)) == 0
    _assert_rows_equal(outcome.rows[case.feature], _alone(case, "c"), exact=True)


@OVERLAP
def test_an_ended_item_runs_its_partial_batch_at_once_when_no_other_item_streams(overlap: bool) -> None:
    case, batches = CASES["i3d_rgb"], []
    ex = _make(case, overlap)
    _record(ex, batches)
    runs = {"b": engine.ItemRun({case.feature: ex}, case.info("b"), [case.feature])}
    fed = iter([*[("b", kind, p) for kind, p in case.stream("b")], ("b", engine.END, None), ("c", "frames", None)])
    key, outcome = next(engine.run_group(runs, fed))  # before the next event is read
    assert key == "b" and batches == [["b", "b"]] and outcome.rows[case.feature].status == Status.OK
    assert next(fed) == ("c", "frames", None) and len(_pool(ex)) == 0


@pytest.mark.slow
def test_real_i3d_forward_on_a_mixed_batch_matches_each_item_alone() -> None:
    case, batches = Case("i3d_rgb", lambda: _i3d(real=True), CASES["i3d_rgb"].info, lambda k: _frame_stream(k)[:2]), []
    ex = case.make()  # every item: 14 frames, one stack; the two stacks fill one I3D batch of 2
    ex.stack_batch = 2
    _record(ex, batches)
    runs = {k: engine.ItemRun({case.feature: ex}, case.info(k), [case.feature]) for k in ("a", "b")}
    out = dict(engine.run_group(runs, engine.interleave({k: iter(case.stream(k)) for k in runs})))
    assert sorted(map(sorted, batches)) == [["a", "b"]], batches
    for k in ("a", "b"):
        got, want = out[k].row_or_raise(case.feature), _alone(case, k)
        assert got.values.shape == (1, 1024) and np.abs(got.values).max() > 0
        # float16 rows of float32 features that differ only in summation order (conv kernels vary with the batch
        # size, ~1e-7 relative): equal to within one float16 step
        np.testing.assert_allclose(got.values.astype(np.float32), want.values.astype(np.float32),
                                   rtol=2.0**-10, atol=2.0**-24)


class _Member:
    """A pool member that keeps what it is given."""

    def __init__(self) -> None:
        self.rows: dict[int, Any] = {}
        self.errors: list[BaseException] = []

    def deliver(self, key: int, row: Any) -> None:
        self.rows[key] = row

    def fail(self, error: BaseException) -> None:
        self.errors.append(error)


def test_an_accelerator_pool_hands_batches_to_its_model_thread_and_the_caller_goes_on() -> None:
    started, release, ran_on = threading.Event(), threading.Event(), []

    def model(xs: list[int]) -> list[int]:
        ran_on.append(threading.get_ident())
        started.set()
        assert release.wait(30)
        return [10 * x for x in xs]

    pool, member = engine.BatchPool("sim", lambda: 2, model, overlap=True), _Member()
    pool.add(member, [0, 1], [0, 1])  # a full batch: handed to the model thread, not waited for
    assert started.wait(30) and member.rows == {}  # the model is still running and the caller is back
    # the next full batch is queued behind it, then the caller waits for the first: OVERLAP_DEPTH batches out
    caller = threading.Thread(target=lambda: [pool.add(member, [k, k + 1], [k, k + 1]) for k in (2, 4)])
    caller.start()
    caller.join(0.3)
    assert caller.is_alive() and member.rows == {}  # blocked: OVERLAP_DEPTH batches out
    release.set()
    caller.join(30)
    pool.add(member, [6], [6])
    pool.flush()
    assert member.rows == {k: 10 * k for k in range(7)} and not member.errors
    assert threading.get_ident() not in ran_on and len(set(ran_on)) == 1


def test_a_failed_batch_on_the_model_thread_reaches_its_session_in_the_callers_thread() -> None:
    def model(xs: list[int]) -> list[int]:
        if 3 in xs:
            raise RuntimeError("scripted failure on input 3")
        return list(xs)

    pool, good, bad = engine.BatchPool("sim", lambda: 4, model, overlap=True), _Member(), _Member()
    pool.add(good, [0, 1], [0, 1])
    pool.add(bad, [3, 4], [3, 4])  # a mixed full batch that fails: retried per member on delivery
    pool.flush()
    assert good.rows == {0: 0, 1: 1} and not good.errors
    assert bad.rows == {} and "scripted failure on input 3" in str(bad.errors[0])
