"""The engine on a thread of its own, fed from asyncio.

`Engine` is not thread safe, so exactly one thread touches it: the loop below. Everyone else talks to it
through a command queue (add, cancel) and hears back through per-request asyncio queues, filled with
`loop.call_soon_threadsafe` once per step per event loop (not once per token: a step may finish hundreds).

    engine thread:  drain commands -> step() -> route outputs -> (idle? wait on the condition)

Idle for RECLAIM_IDLE_S with the process grown since the last time, the thread gives memory back
(`memory.IdleReclaimer`: garbage collection and malloc_trim), so heavy requests do not leave the server large.

Commands are applied between steps, so a cancel lands at most one step late and the request's KV blocks go
back to the pool before the next forward. An exception from `step()` fails every request in flight (each
sees an "error" output), cancels them in the engine to free their cache, and the loop keeps serving.
"""
from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from phi4mm.engine.engine import Engine, EngineBusy, StepOutput
from phi4mm.engine.memory import RECLAIM_IDLE_S, IdleReclaimer


@dataclass
class _Route:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Add:
    args: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    reply: asyncio.Future  # resolved on the caller's loop: the request id, or the engine's exception


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class RequestStream:
    """Async iterator over one request's StepOutputs; ends after the output with `finished=True`."""

    def __init__(self, owner: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.owner, self.request_id, self._queue = owner, request_id, queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        out: StepOutput = await self._queue.get()
        self.finished = out.finished
        return out

    async def get(self, timeout: float | None = None) -> StepOutput:
        """Next output, or asyncio.TimeoutError after `timeout` seconds (lets callers poll for disconnects)."""
        out = await asyncio.wait_for(self._queue.get(), timeout)
        self.finished = out.finished
        return out

    def cancel(self) -> None:
        """Stop the request (no-op once finished): its cache is freed on the engine thread."""
        if not self.finished:
            self.owner.cancel(self.request_id)
            self.finished = True


class AsyncEngine:
    """Runs `engine.step()` on one background thread while there is work; idle, it sleeps on a condition.
    reclaimer: releases memory when the engine has been idle a moment (None: never)."""

    def __init__(self, engine: Engine, on_step: Callable[[Engine, list[StepOutput], float], None] | None = None,
                 reclaimer: IdleReclaimer | None = None):
        self.engine = engine
        self._on_step = on_step  # metrics hook, called on the engine thread after each step (seconds taken)
        self.reclaimer = reclaimer
        # Idle, the thread wakes up this often to see whether memory should be released (None: it sleeps).
        self._idle_wait_s = RECLAIM_IDLE_S if reclaimer is not None and reclaimer.enabled else None
        self._commands: deque = deque()
        self._cond = threading.Condition()
        self._routes: dict[str, _Route] = {}
        self._stopping = False
        self.error_count = 0
        self._thread = threading.Thread(target=self._run, name="phi4mm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side (any thread)
    async def submit(self, prompt: Any, images: Any = None, audios: Any = None, params: Any = None,
                     tools: Any = None, request_id: str | None = None) -> RequestStream:
        """Queue a request (arguments as `Engine.add_request`); returns its stream of outputs.

        The engine's own errors (ValueError subclasses for bad input, EngineBusy) are raised here, to the caller.
        """
        if not self.alive:
            raise RuntimeError("the engine thread has stopped; restart the server")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reply = loop.create_future()
        args = dict(prompt=prompt, images=images, audios=audios, params=params, tools=tools, request_id=request_id)
        self._push(_Add(args, loop, queue, reply))
        try:
            rid = await asyncio.shield(reply)
        except asyncio.CancelledError:
            # The caller went away while the engine was admitting it: cancel the request once it has an id.
            reply.add_done_callback(lambda f: f.cancelled() or f.exception() or self.cancel(f.result()))
            raise
        finally:
            # A refusal raised here carries this frame in its traceback, and the future it came from holds the
            # refusal: without this the pair would be a reference cycle that keeps the prompt's tensors (`args`)
            # until Python's rare full collection (240 MB for eight large images).
            del reply, args
        return RequestStream(self, rid, queue)

    def cancel(self, request_id: str) -> None:
        """Thread-safe; applied on the engine thread between steps."""
        self._push(("cancel", request_id))

    def call(self, fn: Callable[[Engine], Any], timeout: float = 30.0) -> Any:
        """Run `fn(engine)` on the engine thread and return its result (blocking; for tests and stats)."""
        c = _Call(fn)
        self._push(c)
        if not c.done.wait(timeout):
            raise TimeoutError(f"the engine thread did not answer within {timeout} s")
        if c.error is not None:
            raise c.error
        return c.result

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def num_in_flight(self) -> int:
        return len(self._routes)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _push(self, cmd: Any) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                idle = False
                while not self._commands and not eng.has_work() and not self._stopping:
                    if not self._cond.wait(self._idle_wait_s):
                        idle = True  # nothing arrived for a while
                        break
                if self._stopping:
                    break
                commands, self._commands = self._commands, deque()
            if idle:
                self._reclaim()
                continue
            cancelled = any(isinstance(c, tuple) for c in commands)
            while commands:
                # Popped, not iterated: no local of this loop keeps the last request's inputs (its pixels, its
                # audio) alive while the thread sleeps after it.
                self._apply(commands.popleft())
            if not eng.has_work():
                if cancelled:
                    # A cancel frees its blocks at once but leaves the request in the engine's table until the
                    # next step reports it; with nothing else to run, take that (forward-free) step now.
                    self._route(eng.step())
                continue
            t0 = time.perf_counter()
            try:
                outs = eng.step()
            except Exception as e:  # a bug or a device error: fail what is in flight, keep the server up
                traceback.print_exc()
                self.error_count += 1
                outs = self._fail_all(f"internal error in the engine step: {type(e).__name__}: {e}")
            if self._on_step is not None:
                try:
                    self._on_step(eng, outs, time.perf_counter() - t0)
                except Exception:
                    traceback.print_exc()
            if self.reclaimer is not None:
                self.reclaimer.working()
            self._route(outs)
        self._route(self._fail_all("the server is shutting down"))

    def _reclaim(self) -> None:
        try:
            self.reclaimer.idle()
        except Exception:  # memory hygiene must never stop the engine thread
            traceback.print_exc()

    def _apply(self, cmd: Any) -> None:
        eng = self.engine
        if isinstance(cmd, _Add):
            try:
                rid = eng.add_request(**cmd.args)
            except (ValueError, EngineBusy) as e:
                # A refusal: the caller needs its message only. Its traceback's frames hold `cmd`, whose future
                # will hold the refusal, a cycle that would keep the prompt's tensors until a full collection.
                cmd.loop.call_soon_threadsafe(_settle, cmd.reply, None, e.with_traceback(None))
                return
            except BaseException as e:  # a bug: goes back to the caller as it is, traceback and all
                cmd.loop.call_soon_threadsafe(_settle, cmd.reply, None, e)
                return
            self._routes[rid] = _Route(cmd.loop, cmd.queue)
            cmd.loop.call_soon_threadsafe(_settle, cmd.reply, rid, None)
        elif isinstance(cmd, _Call):
            try:
                cmd.result = cmd.fn(eng)
            except BaseException as e:
                cmd.error = e
            cmd.done.set()
        else:
            _, rid = cmd
            eng.cancel(rid)  # frees its blocks now; False when it already finished
            # Answer the listener at once: the engine reports the cancellation only at its next step, which
            # may be long in coming when nothing else is running.
            route = self._routes.pop(rid, None)
            if route is not None:
                self._deliver_to(route, StepOutput(rid, None, "", True, "cancelled"))

    def _fail_all(self, message: str) -> list[StepOutput]:
        outs = []
        for rid in list(self._routes):
            try:
                self.engine.cancel(rid)  # frees its blocks; the engine would report "cancelled" next step
                self.engine.seqs.pop(rid, None)
            except Exception:
                traceback.print_exc()
            outs.append(StepOutput(rid, None, "", True, "error", error=message))
        return outs

    @staticmethod
    def _deliver_to(route: _Route, out: StepOutput) -> None:
        try:
            route.loop.call_soon_threadsafe(_deliver, [(route.queue, out)])
        except RuntimeError:
            pass

    def _route(self, outs: list[StepOutput]) -> None:
        # Group by event loop: one thread-safe callback per loop per step.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
        for out in outs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue  # cancelled by its client: nobody is listening
            if out.finished:
                del self._routes[out.request_id]
            batches.setdefault(route.loop, []).append((route.queue, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                pass  # that loop is closed (a client gone with its loop)


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _deliver(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """Interleave several streams (the `n` choices of one response) as (choice index, output)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        async for out in s:
            await queue.put((i, out))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, out = await queue.get()
            left -= out.finished
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
