"""The queue in front of the model: requests wait here and join the running batch on one worker thread.

Design decisions:

- One worker thread owns the model; the event loop never runs a forward, so it keeps answering health checks,
  429s and other clients while the batch decodes.
- Continuous batching: between two decoding steps the worker adds the waiting requests to the running batch (up to
  ``max_batch_size`` rows), prefilling their prompts; a request that is done leaves at once and is answered. When
  the worker is idle, a new batch waits up to ``max_wait_s`` from its first request's arrival for more, so that
  requests arriving together are prefilled together.
- Admission is decided on the event loop at submit time: beyond ``max_queue`` waiting requests the caller gets
  ``Overloaded`` (an HTTP 429), never an unbounded queue.
- Results travel back through each request's ``asyncio.Queue``, filled from the worker with
  ``call_soon_threadsafe``; ``cancel`` (a client that left or timed out) removes a request from the queue, or from
  the batch at the next step.
- ``wait_for`` lets a caller (a test, a health probe) wait on the batcher's state without reading its internals:
  every change of the queue or the batch wakes it.
- ``close`` lets the worker finish everything admitted before it exits (graceful shutdown).
- A worker that dies (anything escaping a step: a failed forward only fails its rows, but a bug or a
  ``BaseException`` ends the thread) answers every admitted request with a 503 and sets ``failure``; from then on
  ``submit`` raises ``Stopped``, so requests fail at once instead of waiting for their timeout, and the server's
  health check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loramoe.inference.loop import Completion, Request, TokenLoop
from loramoe.inference.sampling import Sampling

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; retry later."""


class ShuttingDown(Exception):
    """The server is shutting down and takes no new requests."""


class Stopped(Exception):
    """The decoding thread died; nothing more can be decoded."""


@dataclass
class Failed:
    """The request failed; ``message`` says why, ``status`` is 400 for its own settings, 503 when the decoding
    thread died, and 500 otherwise."""

    message: str
    status: int = 500


@dataclass(eq=False)  # identity, not field equality: two identical requests are two jobs
class Job:
    """One admitted request: what to generate and the queue its events arrive on (text deltas when ``stream``,
    then a ``Completion`` or ``Failed``)."""

    prompt_ids: list[int]
    sampling: Sampling
    router_stats: bool
    loop: asyncio.AbstractEventLoop
    stream: bool = True
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False  # its Completion or Failed was sent

    def send(self, event: str | Completion | Failed) -> None:
        """Called on the worker thread."""
        self.done = self.done or not isinstance(event, str)
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def request(self) -> Request:
        return Request(
            self.prompt_ids,
            self.sampling,
            on_finish=self.send,
            on_text=self.send if self.stream else None,
            on_error=lambda err: self.send(Failed(str(err), err.status)),
            router_stats=self.router_stats,
            cancelled=lambda: self.cancelled,
        )


class Batcher:
    """Admits requests and decodes them, continuously batched, on a worker thread.

    Args:
        loop: the token loop that decodes on the model.
        max_batch_size: most requests decoded together (one forward serves them all).
        max_wait_s: how long an idle worker waits for more requests after the first arrived.
        max_queue: most requests waiting to join the batch; more are refused with ``Overloaded``.
    """

    def __init__(self, loop: TokenLoop, *, max_batch_size: int, max_wait_s: float, max_queue: int):
        self.loop = loop
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._jobs: dict[int, Job] = {}  # id(request) -> job, for the batch being decoded
        self.steps = 0  # decoding steps (forwards of the running batch) so far
        self.joins = 0  # times requests joined the batch (prefills) so far
        # Requests given up (client gone or timed out) that left the queue or the batch unanswered.
        self.abandoned = 0
        self.failure: str | None = None  # why the decoding thread died
        self._thread = threading.Thread(target=self._work, name="loramoe-serve-decoder", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Requests in the batch that are not answered yet."""
        return sum(not (job.done or job.cancelled) for job in list(self._jobs.values()))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a request (call on the event loop).

        Raises:
            Overloaded: ``max_queue`` requests are already waiting.
            ShuttingDown: ``close`` was called.
            Stopped: the decoding thread died.
        """
        with self._wake:
            if self.failure is not None:
                raise Stopped(self.failure)
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(job)
            self._wake.notify_all()

    def cancel(self, job: Job) -> None:
        """Give up on a request (its client left or timed out): it leaves the queue, or its batch at the next step.

        A no-op for a request already answered. Safe to call from any thread.
        """
        with self._wake:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.abandoned += not job.done
            self._wake.notify_all()

    def wait_for(self, condition: Callable[[Batcher], bool], timeout: float) -> bool:
        """Block until ``condition(self)`` holds (checked at every change of the queue or the batch) or ``timeout``
        seconds pass; returns whether it held."""
        with self._wake:
            return self._wake.wait_for(lambda: condition(self), timeout)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the worker finish the admitted ones, and wait up to ``timeout`` s for it."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether requests can still be decoded (false once the decoding thread died)."""
        return self.failure is None and (self._thread.is_alive() or self._closing)

    def _work(self) -> None:
        joining: list[Job] | None = []
        try:
            with self.loop.session():
                while True:
                    joining = self._take()
                    if joining is None:
                        return
                    if joining:
                        self._decode(self.loop.add, joining)
                        self.joins += 1
                    if self.loop.active:
                        self._decode(self.loop.step)
                        self.steps += 1
                    self._forget_finished()
        except BaseException as err:  # the thread ends here whatever it was: say so to everyone waiting
            logger.critical(
                "the decoding thread stopped; the server cannot answer any more requests", exc_info=True
            )
            self._die(f"{type(err).__name__}: {err}", joining or [])

    def _die(self, reason: str, taken: list[Job]) -> None:
        with self._wake:
            self.failure = f"the decoding thread stopped ({reason}); restart the server"
            jobs = [*taken, *self._waiting, *self._jobs.values()]
            self._waiting.clear()
            self._wake.notify_all()
        for job in jobs:
            if not job.done:
                job.send(Failed(self.failure, 503))

    def _decode(self, run: Callable, joining: list[Job] | None = None) -> None:
        """One prefill (``joining``) or step; a failed forward fails the requests it ran and the server carries on."""
        requests = [job.request() for job in joining] if joining else []
        with self._wake:
            self._jobs.update({id(r): job for r, job in zip(requests, joining or [])})
        try:
            run(requests) if joining else run()
        except Exception as err:  # a failed forward answers its requests; the server keeps serving
            logger.exception("decoding failed")
            failed = requests if joining else list(self.loop.active)
            if not joining:
                self.loop.fail_all(err)
            for r in failed:
                job = self._jobs.get(id(r))
                if job is not None and not job.done:
                    job.send(Failed(f"generation failed: {type(err).__name__}: {err}"))

    def _forget_finished(self) -> None:
        with self._wake:
            active = {id(r) for r in self.loop.active}
            left = [job for key, job in self._jobs.items() if key not in active]
            self.abandoned += sum(job.cancelled and not job.done for job in left)
            self._jobs = {key: job for key, job in self._jobs.items() if key in active}
            self._wake.notify_all()

    def _take(self) -> list[Job] | None:
        """The requests to add before the next step (none when the batch is full); ``None`` once closing with
        nothing left. An idle worker blocks until a request arrives, then waits up to ``max_wait_s`` for more."""
        with self._wake:
            room = self.max_batch_size - len(self.loop.active)
            if not self.loop.active:
                while not self._waiting:
                    if self._closing:
                        return None
                    self._wake.wait()
                deadline = self._waiting[0].arrived + self.max_wait_s
                while len(self._waiting) < room and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._waiting:
                        break
                    self._wake.wait(remaining)
            return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
