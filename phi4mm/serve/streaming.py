"""Server-sent events for streamed chat and completion responses.

A stream listens for its client hanging up while it sends: a disconnect cancels the engine requests at once.
An error after the first byte (the engine failed on this request, the server's drain deadline passed) is
sent as an error event before `[DONE]`, since the status line has already gone.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from fastapi.responses import StreamingResponse

from phi4mm.engine.async_engine import RequestStream, merge
from phi4mm.engine.engine import StepOutput
from phi4mm.inputs.tools import ContentDelta, ToolCallStreamParser
from phi4mm.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    sse,
    usage,
)
from phi4mm.serve.server import Choice, Server


class SSEResponse(StreamingResponse):
    """Streams while listening for the client hanging up: a disconnect cancels the requests at once (whatever
    the ASGI version), instead of when the next token fails to send."""

    def __init__(self, body: AsyncIterator[str], streams: list[RequestStream], srv: Server,
                 headers: dict | None = None):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **(headers or {})})
        self._streams, self._srv = streams, srv

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-send
                    tg.cancel_scope.cancel()
                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._srv.release(self._streams)
            await self.body_iterator.aclose()


async def chat_stream(srv: Server, streams: list[RequestStream], req: ChatRequest, head: dict,
                      offered: set[str] | None, t0: float) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    choices = [Choice() for _ in streams]
    parsers = [ToolCallStreamParser(f"call_{head['id'][9:21]}_{i}_", offered) if offered is not None else None
               for i in range(len(streams))]
    n_calls = [0] * len(streams)
    want_lp = req.logprobs

    def chunk(i: int, delta: dict, reason: str | None = None, lp: list | None = None) -> str:
        logprobs = chat_logprobs(lp, srv.token_bytes) if want_lp and lp is not None else None
        return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

    def deltas(i: int, events: list) -> list[dict]:
        out = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                out.append({"content": ev.text})
            else:
                n_calls[i] += 1
                # as OpenAI streams a call: id and name first, then the arguments
                out.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                            "function": {"name": ev.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]})
        return out

    for i in range(len(streams)):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for i, out, new_lp in absorbed(srv, streams, choices, t0):
            events = parsers[i].feed(out.text) if parsers[i] and out.text else (
                [ContentDelta(out.text)] if out.text else [])
            if out.finished and parsers[i]:
                events += parsers[i].finish()
            ds = deltas(i, events)
            for k, d in enumerate(ds):
                yield chunk(i, d, lp=new_lp if k == 0 else None)
            if not ds and new_lp:
                yield chunk(i, {"content": ""}, lp=new_lp)
            if out.finished:
                reason = "tool_calls" if n_calls[i] and out.finish_reason == "stop" else out.finish_reason
                yield chunk(i, {}, reason)
    except APIError as e:
        yield sse(e.body())
    else:
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(choices[0].prompt_tokens,
                                                             sum(c.generated for c in choices))})
    yield "data: [DONE]\n\n"


async def absorbed(srv: Server, streams: list[RequestStream], choices: list[Choice], t0: float
                    ) -> AsyncIterator[tuple[int, StepOutput, list]]:
    """(choice index, output, its new logprobs) for each engine output, once its choice has absorbed it.
    An APIError from absorbing (e.g. a stop the request cannot meet) ends the stream: the caller reports it."""
    async for i, out in merge(streams):
        c = choices[i]
        n_lp = len(c.logprobs)
        srv.absorb(c, out, t0)
        yield i, out, c.logprobs[n_lp:]


async def completion_stream(srv: Server, streams: list[RequestStream], req: CompletionRequest, head: dict,
                             echo: list[str], t0: float) -> AsyncIterator[str]:
    choices = [Choice() for _ in streams]
    for i, e in enumerate(echo):
        if e:
            yield sse({**head, "choices": [{"index": i, "text": e, "logprobs": None, "finish_reason": None}]})
    try:
        async for i, out, new_lp in absorbed(srv, streams, choices, t0):
            lp = completion_logprobs(new_lp, srv.token_bytes) if req.logprobs is not None else None
            if out.text or out.finished or lp:
                yield sse({**head, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                                "finish_reason": out.finish_reason if out.finished else None}]})
    except APIError as e:
        yield sse(e.body())
    else:
        if req.include_usage:
            n_prompt = sum(choices[k].prompt_tokens for k in range(0, len(choices), req.n))
            yield sse({**head, "choices": [], "usage": usage(n_prompt, sum(c.generated for c in choices))})
    yield "data: [DONE]\n\n"
