"""The dispatcher without Ray: fake workers that finish, raise, die and come back, on a fake clock."""
from __future__ import annotations

from collections import Counter, deque
from typing import Any

import pytest

from pipelines.dispatch import Assignment, Dispatcher, task_key
from pipelines.plan import CaptionTask, ItemTask
from store.schema import Status


def _items(*names: str) -> list[ItemTask]:
    return [ItemTask(row=i, item_id=n, path=f"/v/{n}.mkv", kind="video", features=("a", "b"))
            for i, n in enumerate(names)]


class FakeCluster:
    """Workers scripted by item name: `die` (every attempt), `die1` (first attempt), `raise`; others finish.

    A dead worker comes back after `down` failed pings (None: never). Runs the event loop `pipelines.run` runs.
    """

    def __init__(self, down: int | None = 1) -> None:
        self.now = 0.0
        self.down = down
        self.failed: list[tuple[Any, str, str]] = []
        self.started: list[Assignment] = []
        self.attempts: Counter = Counter()
        self.pings: Counter = Counter()
        self.dead: set = set()

    def fail(self, task: Any, reason: str, message: str) -> None:
        self.failed.append((task, reason, message))

    def run(self, d: Dispatcher, steps: int = 10_000) -> None:
        for _ in range(steps):
            if d.done:
                return
            for a in d.assignments():
                assert a.worker not in self.dead, "a dead worker got work before answering a ping"
                self.started.append(a)
                self._finish(d, a)
            for w in d.pings_due():
                self.pings[w] += 1
                if self.down is not None and self.pings[w] > self.down:
                    self.dead.discard(w)
                    d.back(w)
                else:
                    d.ping_failed(w)
            self.now += 0.25
        raise AssertionError("the dispatcher never finished")

    def _finish(self, d: Dispatcher, a: Assignment) -> None:
        name = a.task.item_id if isinstance(a.task, ItemTask) else "caption"
        self.attempts[name] += 1
        if name.startswith("die") and (name != "die1" or self.attempts[name] == 1):
            self.dead.add(a.worker)
            d.died(a.worker, "actor died")
        elif name == "raise":
            d.error(a.worker, "TypeError: bug")
        else:
            d.result(a.worker, {"results": {"a": (int(Status.OK), ""), "b": (int(Status.OK), "")}, "seconds": 1.0,
                                "model_seconds": {"a": 0.5}})


def _dispatcher(c: FakeCluster, queues: list[list[Any]], workers: list[int], **kw: Any) -> Dispatcher:
    return Dispatcher(queues, workers, c.fail, clock=lambda: c.now, **kw)


def test_every_task_runs_once_and_hints_name_each_workers_next_item() -> None:
    c = FakeCluster()
    caps = [CaptionTask("cap", 0, 4), CaptionTask("cap", 4, 8)]
    d = _dispatcher(c, [_items("a", "b", "c", "d", "e") + caps], [2])
    c.run(d)
    assert Counter(task_key(a.task) for a in c.started) == Counter(task_key(t) for t in _items(*"abcde") + caps)
    assert d.tally.ok == 7 and d.tally.failed == 0 and not c.failed and d.total == 7
    for w in {a.worker for a in c.started}:
        mine = [a for a in c.started if a.worker == w]
        for cur, nxt in zip(mine, mine[1:]):
            if cur.hint is not None:  # the hinted item is exactly the one this worker runs next
                assert cur.hint == (nxt.task.path, list(nxt.task.features))
    assert any(a.hint for a in c.started) and d.tally.model_seconds["a"] == 3.5 and d.tally.task_seconds == 7.0


def test_without_prefetch_no_hints() -> None:
    c = FakeCluster()
    d = _dispatcher(c, [_items("a", "b", "c")], [1], prefetch=False)
    c.run(d)
    assert [a.hint for a in c.started] == [None, None, None] and d.tally.ok == 3


def test_an_item_that_kills_its_worker_is_retried_then_failed_worker_died() -> None:
    c = FakeCluster(down=2)
    d = _dispatcher(c, [_items("a", "die1", "die", "b")], [2], max_retries=2)
    c.run(d)
    assert c.attempts["die1"] == 2 and c.attempts["die"] == 3  # max_retries=2: three attempts, then FAILED
    assert [(t.item_id, r) for t, r, _ in c.failed] == [("die", "worker_died")]
    assert "died 3 time(s)" in c.failed[0][2]
    assert d.tally.retried == 3 and d.tally.ok == 3 and d.tally.failed == 1
    assert c.pings  # dead workers came back only through pings


def test_a_dead_workers_reserved_item_goes_back_to_the_queue() -> None:
    c = FakeCluster()
    d = _dispatcher(c, [_items("die1", "next", "x")], [1])
    c.run(d)
    first = c.started[0]
    assert first.task.item_id == "die1" and first.hint is not None and first.hint[0] == "/v/next.mkv"
    assert sorted(a.task.item_id for a in c.started) == ["die1", "die1", "next", "x"]
    assert d.tally.ok == 3 and not c.failed


def test_worker_error_fails_the_task_and_keeps_the_worker() -> None:
    c = FakeCluster()
    d = _dispatcher(c, [_items("raise", "a")], [1])
    c.run(d)
    assert [(t.item_id, r) for t, r, _ in c.failed] == [("raise", "worker_error")]
    assert "TypeError: bug" in c.failed[0][2] and d.tally.ok == 1 and not c.pings


def test_a_pool_whose_workers_never_come_back_fails_its_remaining_tasks() -> None:
    c = FakeCluster(down=None)
    logs: list[str] = []
    d = _dispatcher(c, [_items("die", "a", "b"), _items("c")], [1, 1], max_retries=5, max_pings=3,
                    log=logs.append)
    c.run(d)
    reasons = {t.item_id: m for t, r, m in c.failed if r == "worker_died"}
    assert set(reasons) == {"die", "a", "b"} and "no live worker left" in reasons["a"]
    assert c.attempts["die"] == 1 and d.tally.ok == 1  # pool 1 is unaffected
    assert c.pings[(0, 0)] == 4 and any("pool 0" in line for line in logs)


def test_done_does_not_wait_for_a_worker_that_has_no_work_left() -> None:
    c = FakeCluster(down=None)
    d = _dispatcher(c, [_items("die1", "a")], [2], max_pings=10_000)
    c.run(d, steps=50)  # the worker that died never answers; its item was retried on the other one
    assert d.done and d.tally.ok == 2 and not c.failed


def test_mismatched_pools_are_refused() -> None:
    with pytest.raises(ValueError, match="2 task queues for 1 pools"):
        Dispatcher([[], []], [1], lambda *a: None)


def test_lookahead_names_several_next_items_and_a_death_returns_them_in_order() -> None:
    c = FakeCluster()
    d = _dispatcher(c, [_items("a", "die1", "b", "c", "d", "e")], [1], lookahead=3)
    c.run(d)
    first = c.started[0]
    assert first.task.item_id == "a" and [h[0] for h in first.hint] == ["/v/die1.mkv", "/v/b.mkv", "/v/c.mkv"]
    order = [a.task.item_id for a in c.started]
    assert order == ["a", "die1", "b", "c", "d", "e", "die1"]  # reserved items kept their order after the death
    for cur, nxt in zip(c.started, c.started[1:]):
        if cur.hint:
            assert cur.hint[0][0] == nxt.task.path  # the first name is always the next item
    assert d.tally.ok == 6 and not c.failed


class GroupCluster(FakeCluster):
    """FakeCluster whose calls hold several items: a `die`/`raise` item takes the whole call down with it."""

    def _finish(self, d: Dispatcher, a: Assignment) -> None:
        names = [t.item_id if isinstance(t, ItemTask) else "caption" for t in a.tasks]
        for n in names:
            self.attempts[n] += 1
        if any(n.startswith("die") and (n != "die1" or self.attempts[n] == 1) for n in names):
            self.dead.add(a.worker)
            d.died(a.worker, "actor died")
        elif "raise" in names:
            d.error(a.worker, "TypeError: bug")
        else:
            ok = {"a": (int(Status.OK), ""), "b": (int(Status.OK), "")}
            d.result(a.worker, {"items": [{"row": getattr(t, "row", None), "results": ok, "seconds": 1.0}
                                          for t in a.tasks]})


def test_groups_run_several_items_per_call_and_hint_the_next_call() -> None:
    c = GroupCluster()
    caps = [CaptionTask("cap", 0, 4)]
    d = _dispatcher(c, [_items(*"abcdefg") + caps], [1], group=3)
    c.run(d)
    calls = [[getattr(t, "item_id", "caption") for t in a.tasks] for a in c.started]
    assert calls == [["a", "b", "c"], ["d", "e", "f"], ["g"], ["caption"]]  # a caption chunk never joins items
    assert [h[0] for h in c.started[0].hint] == ["/v/d.mkv", "/v/e.mkv", "/v/f.mkv"]  # the next call's items
    assert d.tally.ok == 8 and d.tally.task_seconds == 8.0 and not c.failed


def test_a_group_that_dies_or_raises_retries_its_items_alone_so_only_the_culprit_fails() -> None:
    c = GroupCluster(down=1)
    d = _dispatcher(c, [_items("a", "die", "b", "die1", "c", "raise", "e")], [1], group=3, max_retries=1)
    c.run(d)
    assert sorted((t.item_id, r) for t, r, _ in c.failed) == [("die", "worker_died"), ("raise", "worker_error")]
    assert c.attempts["die"] == 3  # one group death (not counted), then 1 + max_retries deaths alone
    assert d.tally.ok == 5 and d.tally.failed == 2
    alone = [a.tasks for a in c.started if len(a.tasks) == 1]
    assert {t[0].item_id for t in alone} >= {"a", "b", "die1", "c", "raise", "e"}  # every group-mate ran alone


def test_every_idle_worker_gets_a_call_before_any_worker_reserves_next_items() -> None:
    c = GroupCluster()
    d = _dispatcher(c, [_items(*"abcdefgh")], [2], group=4)  # 8 items, 2 workers, 4 per call
    first = d.assignments()
    assert sorted(len(a.tasks) for a in first) == [4, 4]  # before: the first worker took 4 and reserved 4
    assert all(a.hint is None for a in first) and d.queues[0] == deque()


def test_a_worker_left_without_work_takes_half_of_anothers_reserved_items() -> None:
    c = FakeCluster()
    d = _dispatcher(c, [_items(*"abcdef")], [2], lookahead=3)
    first = {a.worker: a for a in d.assignments()}  # w0: a, reserves c d e; w1: b, reserves f
    assert [first[(0, 0)].task.item_id, first[(0, 1)].task.item_id] == ["a", "b"]
    c._finish(d, first[(0, 1)])  # w1 ends its call while w0 still runs a
    nxt = d.assignments()
    c._finish(d, nxt[0])
    last = d.assignments()  # w1: nothing queued or reserved of its own -> takes from w0's reservation
    assert len(last) == 1 and last[0].worker == (0, 1)
    assert [nxt[0].task.item_id, last[0].task.item_id] == ["f", "e"]  # the back of w0's reservation
    assert d.reserved[(0, 0)] == _items(*"abcdef")[2:4]  # w0 keeps c d, whose decodes it started first
    c._finish(d, last[0])
    c._finish(d, first[(0, 0)])
    c.run(d)
    assert d.tally.ok == 6 and not c.failed
    assert sorted(a.task.item_id for a in [*first.values(), *nxt, *last, *c.started]) == list("abcdef")


def test_calls_longer_than_in_flight_split_the_items_evenly_and_name_only_the_next_in_flight() -> None:
    c = GroupCluster()
    d = _dispatcher(c, [_items(*"abcdefghijklmnopqrst")], [2], group=8, in_flight=2)  # 20 items
    first = d.assignments()
    assert [len(a.tasks) for a in first] == [8, 6]  # at most group, at most an even share of what is left
    assert [len(a.hint) for a in first] == [2, 2]  # lookahead 1 + in_flight 2 - 1 (not group - 1)
    for a in first:
        c._finish(d, a)
    c.run(d)
    sizes = [len(a.tasks) for a in [*first, *c.started]]
    assert sum(sizes) == 20 and max(sizes) == 8 and d.tally.ok == 20
    d2 = _dispatcher(GroupCluster(), [_items(*"abcde")], [2], group=8, in_flight=2)
    assert sorted(len(a.tasks) for a in d2.assignments()) == [2, 3]  # few items: nobody takes them all
