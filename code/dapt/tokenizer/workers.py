"""Worker processes for the corpus passes: the stage uses every core it is given.

A pass is a :class:`Job`: the parent reads the corpus and sends it in batches; each worker runs
``job.batch`` on the batches it gets (its small per-batch answer comes back to the parent, which takes
them in corpus order) and keeps the large running totals itself (word counts, token uses) until
``job.finish``. One worker at a time can also run a long task (the domain tokenizer's training) while the
others run passes. With one worker everything runs in this process, in the same order of operations; a
batch holding a very long document (:data:`INLINE_CHARS`) is processed in this process too, since sending
it to a worker would hold it twice (and its pickled copy).
Results never depend on the number of workers: what the workers return is summed or merged in batch order.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from dapt.tokenizer.sentencepiece_model import TokenizerError

MAX_IN_FLIGHT = 2  # batches sent to one worker and not answered yet
WINDOW_PER_WORKER = 4  # batches answered out of order that the parent keeps before it waits
INLINE_CHARS = 16_000_000  # a batch this long is processed here: copying it to a worker would double its memory


class Job(Protocol):
    """One pass over a corpus, run in each worker (or in this process)."""

    def start(self) -> None:
        """Prepare (in the worker): load models, empty the running totals."""

    def batch(self, items: list, extra: Any) -> Any:
        """Process one batch; the answer goes back to the parent (keep it small)."""

    def finish(self) -> Any:
        """The worker's running totals, sent to the parent once at the end."""


class LongTask(Protocol):
    """A task that occupies one worker while the others run passes."""

    def run(self) -> Any:
        """Do the work and return the result (picklable)."""


def available_cores() -> int:
    """The cores this process may use (its CPU affinity, as Slurm and containers set it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def open_pool(workers: int) -> InlinePool | WorkerPool:
    """A pool of ``workers`` processes, or this process alone for one worker."""
    return InlinePool() if workers <= 1 else WorkerPool(workers)


class InlinePool:
    """Runs every job in this process (``workers`` = 1)."""

    workers = 1

    def __init__(self) -> None:
        self.long_tasks: dict[str, LongTask] = {}

    def run(self, job: Job, batches: Iterable[list], collect: Callable[[Any], None],
            extra: Callable[[], Any] = lambda: None) -> list:
        job.start()
        for items in batches:
            collect(job.batch(items, extra()))
        return [job.finish()]

    def start_long(self, name: str, task: LongTask) -> None:
        self.long_tasks[name] = task

    def long_done(self, name: str) -> bool:
        return False

    def wait_long(self, name: str) -> Any:
        return self.long_tasks.pop(name).run()

    def close(self) -> None:
        self.long_tasks.clear()

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError("".join(traceback.format_exception(error)))


def _serve(index: int, tasks, results) -> None:
    """A worker's loop: start a job, answer its batches, send its totals; or run a long task."""
    job = None
    while True:
        message = tasks.get()
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "start":
                job = message[1]
                job.start()
            elif kind == "batch":
                results.put(("answer", index, message[1], job.batch(message[2], message[3])))
            elif kind == "finish":
                results.put(("final", index, job.finish()))
                job = None
            elif kind == "long":
                results.put(("long", index, message[1], message[2].run()))
        except BaseException as error:  # noqa: BLE001 - the parent re-raises it
            results.put(("error", index, _picklable(error)))


class WorkerPool:
    """``workers`` processes that run jobs on batches the parent sends (see the module docstring)."""

    def __init__(self, workers: int):
        method = "fork" if sys.platform == "linux" else "spawn"
        context = multiprocessing.get_context(method)
        self.workers = workers
        self.results = context.Queue()
        self.tasks = [context.Queue() for _ in range(workers)]
        self.processes = [context.Process(target=_serve, args=(i, self.tasks[i], self.results), daemon=True)
                          for i in range(workers)]
        for process in self.processes:
            process.start()
        self.busy: dict[str, int] = {}  # long task -> the worker running it
        self.long_results: dict[str, Any] = {}

    def _receive(self, block: bool = True) -> tuple | None:
        """The next answer or total from a worker, or None after storing a long task's result (or, without
        ``block``, when there is no message); raises if a worker failed or died."""
        while True:
            try:
                message = self.results.get(timeout=0.5) if block else self.results.get_nowait()
            except queue.Empty:
                dead = [p for p in self.processes if not p.is_alive()]
                if dead:
                    raise TokenizerError(
                        f"a worker process of the tokenizer stage died (exit code {dead[0].exitcode}; out of memory?); "
                        "rerun with fewer --workers or more memory.") from None
                if not block:
                    return None
                continue
            if message[0] == "error":
                raise message[2]
            if message[0] == "long":
                _, worker, name, value = message
                self.long_results[name] = value
                self.busy.pop(name, None)
                return None
            return message

    def run(self, job: Job, batches: Iterable[list], collect: Callable[[Any], None],
            extra: Callable[[], Any] = lambda: None) -> list:
        """Run ``job`` over ``batches`` on the workers not busy with a long task; ``collect`` gets the answers
        in batch order, ``extra()`` is sent along with each batch. Returns each worker's totals."""
        free = [w for w in range(self.workers) if w not in self.busy.values()]
        for worker in free:
            self.tasks[worker].put(("start", job))
        in_flight = dict.fromkeys(free, 0)
        answers: dict[int, Any] = {}
        state = {"sent": 0, "collected": 0}

        def drain() -> None:
            while state["collected"] in answers:
                collect(answers.pop(state["collected"]))
                state["collected"] += 1

        def take_one() -> None:
            message = None
            while message is None:
                message = self._receive()
            _, worker, index, answer = message
            in_flight[worker] -= 1
            answers[index] = answer
            drain()

        local = None  # this process's copy of the job, for very long batches
        for items in batches:
            while (min(in_flight.values()) >= MAX_IN_FLIGHT
                   or state["sent"] - state["collected"] >= WINDOW_PER_WORKER * len(free)):
                take_one()
            if sum(len(item.text) for item in items) > INLINE_CHARS:
                if local is None:
                    local = pickle.loads(pickle.dumps(job))
                    local.start()
                answers[state["sent"]] = local.batch(items, extra())
                state["sent"] += 1
                drain()
            else:
                worker = min(in_flight, key=in_flight.__getitem__)
                self.tasks[worker].put(("batch", state["sent"], items, extra()))
                in_flight[worker] += 1
                state["sent"] += 1
            del items
        while state["collected"] < state["sent"]:
            take_one()
        for worker in free:
            self.tasks[worker].put(("finish",))
        finals: dict[int, Any] = {}
        while len(finals) < len(free):
            message = self._receive()
            if message is not None:
                finals[message[1]] = message[2]
        return [finals[w] for w in sorted(finals)] + ([local.finish()] if local is not None else [])

    def start_long(self, name: str, task: LongTask) -> None:
        """Run ``task`` on one worker, which runs no passes until it is done (at least one other must be free)."""
        worker = next(w for w in range(self.workers) if w not in self.busy.values())
        self.busy[name] = worker
        self.tasks[worker].put(("long", name, task))

    def long_done(self, name: str) -> bool:
        """True once the long task's result has arrived."""
        self._receive(block=False)
        return name in self.long_results

    def wait_long(self, name: str) -> Any:
        """The long task's result (waits for it)."""
        while name not in self.long_results:
            self._receive()
        return self.long_results.pop(name)

    def close(self) -> None:
        """Stop the workers (terminating any still busy) and release the queues."""
        for worker, process in enumerate(self.processes):
            if process.is_alive():
                self.tasks[worker].put(("stop",))
        for process in self.processes:
            process.join(timeout=2 if not self.busy else 0.1)
            if process.is_alive():
                process.terminate()
                process.join()
        for channel in [*self.tasks, self.results]:
            channel.cancel_join_thread()
            channel.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
