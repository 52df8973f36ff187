"""The scheduler of a run, without Ray: which worker runs which task next, driven by events.

Events: a task's result (`result`), a task that raised inside a live worker (`error`), a worker that died while
running a task (`died`), a ping answered by a restarted worker (`back`) or not (`ping_failed`). Outputs: tasks to
start (`assignments`) and workers to ping (`pings_due`). The Ray loop in `pipelines.run` only translates between
Ray and these calls, so every rule below is unit-tested with fake workers (tests/test_pipelines_dispatch.py):

- one task at a time per worker, or with `group` > 1 up to that many items in one call (their frames share
  model batches); with `prefetch`, a worker's next items are reserved and named with its current ones (the
  worker starts decoding them early) once every idle worker has its call, and a worker left with nothing takes
  part of another's reservation; a worker that dies gives its reserved items back to the queue;
- an item whose worker died is retried up to `max_retries` times, then FAILED `worker_died` with the count;
  when a call holding several items dies or raises, nobody can tell which item did it: each of them is retried
  alone (not counted as an attempt), so only the culprit uses up its retries and innocent items never fail;
- a restarted worker gets work again only after it answers a ping; one silent for `max_pings` pings is dropped,
  and when a pool has no usable worker left its remaining tasks are FAILED `worker_died`;
- every task ends exactly once: a result, or FAILED rows through `fail(task, reason, message)`.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from pipelines.plan import CaptionTask, ItemTask
from store.schema import Status

Task = ItemTask | CaptionTask
WorkerId = tuple[int, int]  # (pool, worker index in the pool)
FailFn = Callable[[Task, str, str], None]


@dataclass(frozen=True)
class Assignment:
    """Start `task` on `worker`; `hint` = (path, features) of the worker's next item, to decode early."""

    worker: WorkerId
    task: Task
    hint: tuple[str, list[str]] | list[tuple[str, list[str]]] | None = None  # a list when lookahead > 1
    more: tuple[ItemTask, ...] = ()  # further items run in the same call (group > 1)

    @property
    def tasks(self) -> tuple[Task, ...]:
        """Every task of the call, `task` first."""
        return (self.task, *self.more)


@dataclass
class Tally:
    """What finished so far: tasks ok / failed, retries, seconds reported by the workers."""

    ok: int = 0
    failed: int = 0
    retried: int = 0
    model_seconds: Counter = field(default_factory=Counter)
    task_seconds: float = 0.0


def task_key(task: Task) -> tuple:
    """Identity of a task for attempt counting."""
    return ("item", task.row) if isinstance(task, ItemTask) else ("caption", task.feature, task.start)


class Dispatcher:
    """Assigns queued tasks to idle workers and reacts to results, deaths and recoveries."""

    def __init__(self, queues: Sequence[Iterable[Task]], workers: Sequence[int], fail: FailFn, *,
                 max_retries: int = 2, prefetch: bool = True, lookahead: int = 1, group: int = 1,
                 in_flight: int = 0, ping_every: float = 0.5, max_pings: int = 600,
                 clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = lambda _: None,
                 on_done: Callable[[Tally], None] = lambda _: None) -> None:
        """`queues[p]`: tasks of pool p; `workers[p]`: its worker count; `fail` writes a task's FAILED rows;
        `lookahead`: items reserved and named ahead per worker with `prefetch` (decode-stage workers open that
        many remote decodes early, beyond the next call's items); `group`: items per worker call; `in_flight`:
        items a call streams at once (0: all of it), which sets how many next items are named ahead."""
        if len(queues) != len(workers):
            raise ValueError(f"dispatch: {len(queues)} task queues for {len(workers)} pools")
        self.queues = [deque(q) for q in queues]
        self.idle = [deque(range(n)) for n in workers]
        self.fail, self.clock, self.log, self.on_done = fail, clock, log, on_done
        self.max_retries, self.prefetch, self.lookahead = int(max_retries), bool(prefetch), max(1, int(lookahead))
        self.group = max(1, int(group))
        self.in_flight = min(self.group, int(in_flight) or self.group)
        self.solo: set[tuple] = set()  # task keys that run alone from now on (their group call died or raised)
        self.ping_every, self.max_pings = float(ping_every), int(max_pings)
        self.running: dict[WorkerId, tuple[Task, ...]] = {}
        self.reserved: dict[WorkerId, list[Task]] = {}  # worker -> its next items (being prefetched)
        self.recovering: dict[WorkerId, tuple[float, int]] = {}  # worker -> (next ping time, failed pings)
        self.pinging: set[WorkerId] = set()
        self.attempts: Counter = Counter()
        self.tally = Tally()
        self.total = sum(len(q) for q in self.queues)

    @property
    def done(self) -> bool:
        """No task queued, reserved or running (recovering workers with nothing to do do not hold the run)."""
        return not (self.running or any(self.reserved.values()) or any(self.queues))

    # ------------------------------------------------------------------------------------------------- outputs
    def assignments(self) -> list[Assignment]:
        """Tasks to start now, one call per idle worker that has work. Every idle worker gets its call before any
        worker reserves next items, and a worker left with nothing takes part of another's reserved items, so
        reservations never keep a worker idle (with few items, and at the end of every run)."""
        calls: list[tuple[WorkerId, list[Task]]] = []
        for p, q in enumerate(self.queues):
            for a in list(self.idle[p]):
                w = (p, a)
                ahead = self.reserved.setdefault(w, [])
                if not q and not ahead:
                    self._take_reserved(w)
                if not q and not ahead:
                    continue
                size = self._call_size(p)  # counts this worker among the pool's workers
                self.idle[p].remove(a)
                tasks = [ahead.pop(0) if ahead else q.popleft()]
                while len(tasks) < size and self._groupable(tasks[0]) and self._groupable(_head(ahead, q)):
                    tasks.append(ahead.pop(0) if ahead else q.popleft())
                self.running[w] = tuple(tasks)
                calls.append((w, tasks))
        return [self._with_hint(w, tasks) for w, tasks in calls]

    def _with_hint(self, w: WorkerId, tasks: list[Task]) -> Assignment:
        """The call of `tasks` on `w`, naming (and reserving, with prefetch) the worker's next items."""
        ahead, q = self.reserved[w], self.queues[w[0]]
        if self.prefetch and isinstance(tasks[0], ItemTask):
            while len(ahead) < self.lookahead + self.in_flight - 1 and q and isinstance(q[0], ItemTask):
                ahead.append(q.popleft())  # named now so their decoding overlaps this call's compute
        hints = [(t.path, list(t.features)) for t in ahead]
        hint = (hints or None) if self.lookahead > 1 or self.group > 1 else (hints[0] if hints else None)
        return Assignment(w, tasks[0], hint, tuple(tasks[1:]))  # type: ignore[arg-type]

    def _call_size(self, p: int) -> int:
        """Items in pool `p`'s next call: `group`, but at most an even share of what the pool has left (and at
        least `in_flight`), so a big call never holds items another worker could run."""
        workers = len(self.idle[p]) + sum(1 for w in self.running if w[0] == p)
        left = len(self.queues[p]) + sum(len(r) for w, r in self.reserved.items() if w[0] == p)
        return min(self.group, max(self.in_flight, -(-left // max(1, workers))))

    def _take_reserved(self, w: WorkerId) -> None:
        """`w` has no work left: it takes the back half of the largest reservation in its pool (the owner closes
        their early decodes when its next call no longer names them)."""
        donors = [(len(r), v) for v, r in self.reserved.items() if v[0] == w[0] and v != w and r]
        if donors:
            donor = self.reserved[max(donors)[1]]
            k = max(1, len(donor) // 2)
            self.reserved[w].extend(donor[-k:])
            del donor[-k:]

    def _groupable(self, task: Task | None) -> bool:
        """Whether `task` may share a call with other items."""
        return isinstance(task, ItemTask) and task_key(task) not in self.solo

    def pings_due(self) -> list[WorkerId]:
        """Recovering workers to ping now (at most one ping in flight each)."""
        now = self.clock()
        due = [w for w, (when, _) in self.recovering.items() if when <= now and w not in self.pinging]
        self.pinging.update(due)
        return due

    # -------------------------------------------------------------------------------------------------- events
    def result(self, w: WorkerId, summary: dict[str, Any]) -> None:
        """The worker finished its call (its rows are written); it takes the next one. A call of several items
        answers {"items": [one summary per item]}; an item missing from it is FAILED worker_error."""
        tasks = self.running.pop(w)
        self.idle[w[0]].append(w[1])
        summaries = summary["items"] if "items" in summary else [summary]
        for one in summaries:
            self._count(one)
        if len(tasks) > 1:
            rows = {one.get("row") for one in summaries}
            for t in tasks:
                if isinstance(t, ItemTask) and t.row not in rows:
                    self._failed(t, "worker_error", "worker_error: the worker returned no result for this item")

    def _count(self, summary: dict[str, Any]) -> None:
        """Tally one finished task."""
        self.tally.model_seconds.update(summary.get("model_seconds", {}))
        self.tally.task_seconds += float(summary.get("seconds", 0.0))
        res = summary.get("results", {})
        vals = res.values() if isinstance(res, dict) else res
        if any(s == Status.FAILED for s, _ in vals):
            self.tally.failed += 1
        else:
            self.tally.ok += 1
        self.on_done(self.tally)

    def error(self, w: WorkerId, message: str) -> None:
        """The call raised inside a live worker (a bug in the worker itself): FAILED worker_error, run goes on;
        the items of a several-item call are retried alone first."""
        tasks = self.running.pop(w)
        self.idle[w[0]].append(w[1])
        if len(tasks) > 1:
            self._retry_alone(w[0], tasks)
            return
        self._failed(tasks[0], "worker_error", f"worker_error: {message[:1500]}")

    def died(self, w: WorkerId, message: str) -> None:
        """The worker process died running its call: retry its tasks (bounded), ping the worker until it is back."""
        tasks = self.running.pop(w)
        p = w[0]
        self.recovering[w] = (self.clock(), 0)
        for t in reversed(self.reserved.pop(w, [])):  # its next items were never started: any worker may take them
            self.queues[p].appendleft(t)
        if len(tasks) > 1:
            self._retry_alone(p, tasks)
            return
        task = tasks[0]
        key = (p, task_key(task))
        self.attempts[key] += 1
        if self.attempts[key] <= self.max_retries:
            self.tally.retried += 1
            self.queues[p].append(task)
            return
        self._failed(task, "worker_died", f"worker_died: the worker process died {self.attempts[key]} time(s) on "
                     f"this item (segfault, out of memory or exit in a codec/model): {message[:500]}")
        self._drop_if_pool_dead(p)

    def _retry_alone(self, p: int, tasks: Sequence[Task]) -> None:
        """A call of several items failed as a whole: each item runs again on its own (once grouped, never again)."""
        for t in tasks:
            self.solo.add(task_key(t))
            self.queues[p].append(t)
        self.tally.retried += len(tasks)

    def back(self, w: WorkerId) -> None:
        """A restarted worker answered its ping: it takes work again."""
        self.pinging.discard(w)
        if self.recovering.pop(w, None) is not None:
            self.idle[w[0]].append(w[1])

    def ping_failed(self, w: WorkerId) -> None:
        """The worker is still down: ping again later, or give up on it after `max_pings` tries."""
        self.pinging.discard(w)
        if w not in self.recovering:
            return
        n = self.recovering[w][1] + 1
        if n <= self.max_pings:
            self.recovering[w] = (self.clock() + self.ping_every, n)
            return
        del self.recovering[w]
        self.log(f"worker {w[1]} of pool {w[0]} did not come back after {n - 1} pings; it gets no more work")
        self._drop_if_pool_dead(w[0])

    # --------------------------------------------------------------------------------------------------- inner
    def _failed(self, task: Task, reason: str, message: str) -> None:
        """A task ends without a result: its FAILED rows, counted."""
        self.fail(task, reason, message)
        self.tally.failed += 1
        self.on_done(self.tally)

    def _drop_if_pool_dead(self, p: int) -> None:
        """When no worker of pool `p` is usable any more, fail its remaining tasks instead of waiting forever."""
        alive = self.idle[p] or any(w[0] == p for w in self.running) or any(w[0] == p for w in self.recovering)
        if alive or not self.queues[p]:
            return
        self.log(f"every worker of pool {p} is gone; marking its {len(self.queues[p])} remaining task(s) FAILED")
        while self.queues[p]:
            self._failed(self.queues[p].popleft(), "worker_died", "worker_died: no live worker left to run this item")


def _head(ahead: list[Task], q: deque[Task]) -> Task | None:
    """The task a worker's call takes next: its reserved items first, then the queue."""
    return ahead[0] if ahead else (q[0] if q else None)
