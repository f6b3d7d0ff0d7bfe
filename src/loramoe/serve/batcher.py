"""The queue in front of the model: requests wait here, are gathered into batches and decoded on one worker thread.

Design decisions:

- One worker thread owns the model; the event loop never runs a forward, so it keeps answering health checks,
  429s and other clients while a batch decodes.
- A batch is gathered when the worker is free: it takes what is waiting, and if that is less than a full batch it
  waits up to ``max_wait_s`` from the first request's arrival for more. Requests that arrive while a batch decodes
  wait for the next batch (no joining mid-batch: the KV cache rows of a batch share one length).
- Admission is decided on the event loop at submit time: beyond ``max_queue`` waiting requests the caller gets
  ``Overloaded`` (an HTTP 429), never an unbounded queue.
- Results travel back through each request's ``asyncio.Queue``, filled from the worker with
  ``call_soon_threadsafe``; a request whose client left or timed out is marked cancelled and leaves its batch at
  the next step.
- ``close`` lets the worker finish everything admitted before it exits (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loramoe.serve.decode import Decoder, Finish, Generation, Sampling

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; retry later."""


class ShuttingDown(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class Failed:
    """The batch a request was in failed; ``message`` says why."""

    message: str


@dataclass(eq=False)  # identity, not field equality: two identical requests are two jobs
class Job:
    """One admitted request: what to generate and the queue its events arrive on (text deltas, then a ``Finish``
    or ``Failed``)."""

    prompt_ids: list[int]
    sampling: Sampling
    router_stats: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False  # its Finish or Failed was sent

    def send(self, event: str | Finish | Failed) -> None:
        """Called on the worker thread."""
        self.done = self.done or not isinstance(event, str)
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def stream(self) -> AsyncIterator[str | Finish | Failed]:
        """The events in order, ending with the ``Finish`` or ``Failed``."""
        while True:
            event = await self.events.get()
            yield event
            if not isinstance(event, str):
                return

    def generation(self) -> Generation:
        return Generation(
            self.prompt_ids,
            self.sampling,
            on_text=self.send,
            on_finish=self.send,
            router_stats=self.router_stats,
            cancelled=lambda: self.cancelled,
        )


class Batcher:
    """Admits requests and decodes them in batches on a worker thread.

    Args:
        decoder: runs a batch on the model.
        max_batch_size: most requests decoded together (one forward serves them all).
        max_wait_s: how long a batch that is not full waits for more requests after the first arrived.
        max_queue: most requests waiting for a batch; more are refused with ``Overloaded``.
    """

    def __init__(self, decoder: Decoder, *, max_batch_size: int, max_wait_s: float, max_queue: int):
        self.decoder = decoder
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._batch: list[Job] = []  # the batch being decoded
        self.batches = 0  # batches decoded so far
        self._thread = threading.Thread(target=self._work, name="loramoe-serve-decoder", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Requests of the batch being decoded that are not answered yet."""
        return sum(not (job.done or job.cancelled) for job in self._batch)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a request (call on the event loop).

        Raises:
            Overloaded: ``max_queue`` requests are already waiting.
            ShuttingDown: ``close`` was called.
        """
        with self._wake:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Give up on a request (its client left or timed out): it leaves the queue, or its batch at the next step."""
        with self._wake:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the worker finish the admitted ones, and wait up to ``timeout`` s for it."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._batch = batch
            try:
                self.decoder.run([job.generation() for job in batch])
            except Exception as err:  # a failed batch answers its requests; the server keeps serving
                logger.exception("decoding a batch of %d failed", len(batch))
                for job in (job for job in batch if not job.done):
                    job.send(Failed(f"generation failed: {type(err).__name__}: {err}"))
            finally:
                self._batch = []
                self.batches += 1

    def _gather(self) -> list[Job] | None:
        """The next batch, or ``None`` once closing and nothing is left."""
        with self._wake:
            while True:
                if self._waiting:
                    deadline = self._waiting[0].arrived + self.max_wait_s
                    while len(self._waiting) < self.max_batch_size and not self._closing:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._wake.wait(remaining)
                    batch = [
                        self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))
                    ]
                    if batch:
                        return batch
                elif self._closing:
                    return None
                else:
                    self._wake.wait()
