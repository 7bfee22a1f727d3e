"""Thin handlers: parse -> shape -> convert -> engine -> JSON or SSE.

Contract: handlers never see vllm types and never build error responses themselves
(they raise; middleware maps). A handler picks its answer's ``convert.Shape`` (chat or
text completion) once; ``_whole`` answers with one JSON body, ``_streamed`` with SSE. A
streamed response, once started, ends with ``data: [DONE]`` on success, or with one
``data: {"error": ...}`` event and ``[DONE]`` if the engine fails mid-stream. A client
that goes away aborts its engine request. Each fact for the access-log line is written
once, into the request's ``RequestRecord`` (``keys.RECORD``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .. import shaping
from ..config import Config, LimitsConfig
from ..engine_protocol import PromptTokenizer, ServingEngine
from ..generation import ChatMessage, Delta, GenerationRequest
from . import convert, errors, locality, protocol, toolcalls
from .errors import ApiError, classify, to_sse_event
from .keys import ADMISSION, CONFIG, GATE, HEALTH, METRICS, RECORD, STARTED_WALL

ParsedRequest = protocol.ChatRequest | protocol.CompletionRequest
ParsedT = TypeVar("ParsedT", protocol.ChatRequest, protocol.CompletionRequest)
T = TypeVar("T")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no", "Connection": "keep-alive"}


async def read_json(request: web.Request) -> Any:
    """The request body as checked JSON: 413 past the size limit, 408 when the client sends
    it too slowly (``server.body_timeout_s``), 400 when its encoding cannot be undone."""
    server = request.app[CONFIG]().server
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body is {request.content_length} bytes, above this server's limit "
                            f"of {limit} bytes", code="request_too_large", close=True)
    try:
        async with asyncio.timeout(server.body_timeout_s):
            raw = await request.read()   # aiohttp raises 413 past client_max_size for chunked bodies
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {server.body_timeout_s:g}s",
                       code="request_timeout", close=True) from None
    except (RequestPayloadError, HttpProcessingError) as e:   # e.g. gzip that does not decompress
        raise ApiError(400, "request body could not be read: "
                            f"{str(e).replace(chr(10), ' ').strip() or type(e).__name__}"[:300],
                       code="invalid_encoding", close=True) from None
    return protocol.decode_json(raw)


def _check_model(cfg: Config, model: str) -> None:
    if model not in (cfg.model.name, cfg.model.path):
        shown = model if len(model) <= 128 else model[:128] + "..."
        raise ApiError(404, f"the model '{shown}' does not exist; this server serves "
                            f"'{cfg.model.name}'", type="invalid_request_error", param="model",
                       code="model_not_found")


async def _parse(request: web.Request,
                 parse: Callable[[Any, LimitsConfig], ParsedT]) -> tuple[Config, ParsedT, str | None]:
    """The current config, the parsed request (checked model) and its session id."""
    cfg = request.app[CONFIG]()
    req = parse(await read_json(request), cfg.limits)
    _check_model(cfg, req.model)
    return cfg, req, protocol.session_id(request.headers, req.user)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    cfg, req, session = await _parse(request, protocol.parse_chat)
    gate = request.app[GATE]
    async with gate.track():
        engine = await gate.serving_engine()
        tok, max_len = engine.tokenizer, engine.max_model_len
        messages = req.messages
        tools = req.tools.definitions if req.tools else ()
        render: Callable[[list[ChatMessage]], str] = lambda ms: tok.render_chat(ms, tools)  # noqa: E731
        text = shaping.prompt_text(messages)
        size = len(text) + (len(json.dumps(tools)) if tools else 0)
        shaped = shaping.defaults(cfg, text, shaping.last_user_text(messages))
        headers: dict[str, str] = {}
        if cfg.shaping.on_overlong == "truncate":
            messages, dropped, prompt_ids = await _off_loop(size, lambda: _fit(
                tok, render, max_len, messages, req.sampling.max_tokens, shaped.sampling.max_tokens))
            if dropped:
                headers["X-Qwenbox-Truncated"] = f"dropped {dropped} oldest message(s) to fit the context"
                request[RECORD].truncated = dropped
                request.app[METRICS].truncated.inc()
        else:
            within = await _off_loop(size, lambda: tok.encode_within(render(messages), max_len))
            if within is None:
                raise errors.prompt_too_long(max_len)
            prompt_ids = within
        read = None
        if req.tools is not None and req.tools.parsed:
            req, read = _with_tools(engine, req, req.tools)
        return await _admit_and_run(request, cfg, engine, req, [Prompt(prompt_ids, shaped)], session, headers,
                                    convert.CHAT, read)


Reader = Callable[[AsyncGenerator[list[Delta], None]], AsyncGenerator[list[Delta], None]]


def _with_tools(engine: ServingEngine, req: protocol.ChatRequest,
                tools: protocol.Tools) -> tuple[protocol.ChatRequest, Reader]:
    """The request as the engine runs it when its answer is read for tool calls (a forced
    call under its schema; the model's special tokens kept for the parser), and the reader."""
    definitions = list(tools.definitions)
    calling = toolcalls.ToolCalling(tools, lambda: engine.tool_parser(definitions), req.stream)
    constraint = toolcalls.guided(tools)
    sampling = dataclasses.replace(req.sampling, skip_special_tokens=False,
                                   guided=constraint if constraint is not None else req.sampling.guided)
    return dataclasses.replace(req, sampling=sampling), calling.read


_LARGE_TEXT = 32_768   # characters; tokenizing more than this could stall the event loop


async def _off_loop(size: int, fn: Callable[[], T]) -> T:
    """Run CPU-heavy prompt work in a thread when the text is large, so the event loop (health
    probes, other streams, the watchdog's pings) keeps answering during a huge request."""
    return await asyncio.to_thread(fn) if size > _LARGE_TEXT else fn()


def _fit(tok: PromptTokenizer, render: Callable[[list[ChatMessage]], str], max_len: int, messages: list[ChatMessage],
         client_max_tokens: int | None, shaped_max_tokens: int | None) -> tuple[list[ChatMessage], int, list[int]]:
    """on_overlong = "truncate": drop the oldest turns until prompt + room for the answer fit.
    -> (kept messages, how many were dropped, their token ids)."""
    half = max_len // 2      # the answer's room when neither the client nor shaping sets one
    room = client_max_tokens if client_max_tokens is not None else min(shaped_max_tokens or half, half)
    budget = max_len - room
    # What always stays (system prompts, the last turn) must fit on its own: checked cheaply
    # first, so a huge final turn is refused without tokenizing the whole history.
    keep = [m for m in messages[:-1] if m["role"] == "system"] + messages[-1:]
    if tok.encode_within(render(keep), budget) is None:
        raise _fit_error(max_len, room, f"the system prompt and the last message are more than {budget} tokens")

    def count(ms: list[ChatMessage]) -> int:      # past max_len, "more than max_len" is all that matters
        ids = tok.encode_within(render(ms), max_len)
        return max_len + 1 if ids is None else len(ids)

    try:
        kept, dropped = shaping.fit_messages(messages, count, budget)
    except shaping.Overlong as e:
        raise _fit_error(max_len, room, str(e)) from None
    return kept, dropped, tok.encode(render(kept))


def _fit_error(max_len: int, room: int, why: str) -> ApiError:
    return errors.context_length_exceeded(why, max_len, f"{room} of them are kept for the answer", param="messages")


async def completions(request: web.Request) -> web.StreamResponse:
    cfg, req, session = await _parse(request, protocol.parse_completion)
    gate = request.app[GATE]
    async with gate.track():
        engine = await gate.serving_engine()
        prompts = [await _completion_prompt(engine, p, "prompt" if len(req.prompts) == 1 else f"prompt[{i}]")
                   for i, p in enumerate(req.prompts)]
        _check_prompt_logprobs(cfg.limits, req, prompts)
        return await _admit_and_run(request, cfg, engine, req,
                                    [Prompt(ids, shaping.defaults(cfg, text), _echo(engine, req, ids, text))
                                     for ids, text in prompts], session, {}, convert.COMPLETION)


async def _completion_prompt(engine: ServingEngine, prompt: str | list[int], name: str) -> tuple[list[int], str]:
    """One completion prompt as (token ids, text): ids checked against the vocabulary and
    the context, text encoded within it."""
    tok = engine.tokenizer
    if isinstance(prompt, list):
        bad = next((t for t in prompt if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"'{name}' has token id {bad} outside the vocabulary "
                                f"(0..{tok.vocab_size - 1})", param="prompt")
        if len(prompt) >= engine.max_model_len:
            raise errors.prompt_too_long(engine.max_model_len, len(prompt), param="prompt")
        ids = prompt
        return ids, await _off_loop(len(ids), lambda: tok.decode(ids))
    within = await _off_loop(len(prompt), lambda: tok.encode_within(prompt, engine.max_model_len))
    if within is None:
        raise errors.prompt_too_long(engine.max_model_len, param="prompt")
    return within, prompt


def _check_prompt_logprobs(limits: LimitsConfig, req: protocol.CompletionRequest,
                           prompts: list[tuple[list[int], str]]) -> None:
    """Prompt logprobs (echo with logprobs) make the engine compute logits over the whole
    vocabulary at every prompt position: a prompt may be at most
    ``limits.max_prompt_logprobs_tokens`` long for them (400 otherwise)."""
    if req.sampling.prompt_logprobs is None:
        return
    cap = limits.max_prompt_logprobs_tokens
    for i, (ids, _) in enumerate(prompts):
        if len(ids) > cap:
            name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise ApiError(400, f"'{name}' is {len(ids)} tokens, above this server's cap of {cap} tokens for a "
                                f"prompt whose logprobs are asked ('echo' with 'logprobs'; "
                                f"limits.max_prompt_logprobs_tokens)", param="prompt")


def _echo(engine: ServingEngine, req: protocol.CompletionRequest, ids: list[int], text: str) -> convert.Echo | None:
    """What ``echo`` puts before each choice of this prompt (None without echo)."""
    if not req.echo:
        return None
    first = engine.tokenizer.decode(ids[:1]) if req.sampling.logprobs is not None else ""
    return convert.Echo(text, first, req.generate)


def _padded(cfg: Config, engine: ServingEngine, req: ParsedRequest, ids: list[int]) -> list[int]:
    """The prompt left-padded as ``shaping.pad_prompt_to`` says, unless its logprobs are
    asked: they score the prompt as sent, and padding would change them."""
    if req.sampling.prompt_logprobs is not None:
        return ids
    return shaping.pad(ids, cfg.shaping.pad_prompt_to, engine.tokenizer.pad_token_id)


def _check_logit_bias(engine: ServingEngine, req: ParsedRequest) -> None:
    vocab = engine.tokenizer.vocab_size
    if (bad := next((t for t, _ in req.sampling.logit_bias if t >= vocab), None)) is not None:
        raise ApiError(400, f"'logit_bias' has token id {bad} outside the vocabulary (0..{vocab - 1})",
                       param="logit_bias")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request as admission and the engine take it: its token ids, the
    shaped defaults its sampling falls back on, and what ``echo`` puts before its choices."""
    ids: list[int]
    shaped: shaping.Defaults
    echo: convert.Echo | None = None


async def _admit_and_run(request: web.Request, cfg: Config, engine: ServingEngine, req: ParsedRequest,
                         prompts: list[Prompt], session: str | None, headers: dict[str, str], shape: convert.Shape,
                         read: Reader | None = None) -> web.StreamResponse:
    """Each prompt admitted as a request of its own (admission's bounds and priorities hold
    for every one of a batch; a refusal of any refuses the whole request and frees what the
    others held), then all run at once and answered as one response whose choices are
    ordered by prompt, then by ``n`` (OpenAI's order): index = i x n + j. ``read`` wraps the
    outputs (tool calls)."""
    record, admission, gate = request[RECORD], request.app[ADMISSION], request.app[GATE]
    _check_logit_bias(engine, req)
    if len(prompts) > 1 and len(prompts) > admission.max_in_flight:   # they would wait for each other's slots
        raise errors.bad_request(f"'prompt' is a batch of {len(prompts)} prompts, more than this server runs at "
                                 f"once ({admission.max_in_flight}); send at most that many", param="prompt")
    record.session, record.intent = session, prompts[0].shaped.intent
    async with contextlib.AsyncExitStack() as held:
        gens = []
        for i, p in enumerate(prompts):
            ids = _padded(cfg, engine, req, p.ids)
            ticket = await held.enter_async_context(admission.admit(len(ids), session))
            record.queued_s, record.priority = round(ticket.queued_s, 4), ticket.priority
            gens.append(convert.to_generation(req.sampling, ids, request_id=record.id if len(prompts) == 1
                                              else f"{record.id}-{i}", max_model_len=engine.max_model_len,
                                              defaults=p.shaped, stream=req.stream, priority=ticket.priority))
        for g in gens:       # handed to the engine only now that all are admitted (the watchdog's evidence)
            held.enter_context(gate.running(g.request_id))
        n = gens[0].sampling.n
        record.prompt_len = sum(len(g.prompt_token_ids) for g in gens)
        record.max_tokens, record.stream = max(g.sampling.max_tokens or 0 for g in gens), req.stream
        reader = read or (lambda outputs: outputs)
        one = len(gens) == 1
        outputs: Callable[[], AsyncGenerator[list[Delta], None]] = (
            (lambda: _outputs(request, engine, gens[0])) if one else (lambda: _merged(request, engine, gens, n)))
        answer = Answer(lambda: reader(outputs()), n * len(gens), record.prompt_len,
                        req.sampling.logprobs is not None, tuple(p.echo for p in prompts for _ in range(n)))
        head = shape.head(record.id, req.model)
        if req.stream:
            return await _streamed(request, answer, req.include_usage, headers, shape, head, cfg.server.retry_after_s)
        return await _whole(request, answer, headers, shape, head)


@dataclass(frozen=True)
class Answer:
    """What one response is written from: its engine outputs (made when it is written),
    its number of choices, its prompt tokens (for usage), whether logprobs were asked, and
    per choice its prompt's echo (none without echo)."""
    outputs: Callable[[], AsyncGenerator[list[Delta], None]]
    choices: int
    prompt_tokens: int
    logprobs: bool = False
    echoes: tuple[convert.Echo | None, ...] = ()

    def accumulator(self) -> convert.Accumulator:
        return convert.Accumulator(self.choices, self.logprobs, self.echoes)


async def _merged(request: web.Request, engine: ServingEngine, gens: list[GenerationRequest],
                  n: int) -> AsyncGenerator[list[Delta], None]:
    """Every generation's outputs as they come, choice ``j`` of generation ``i`` as index
    ``i x n + j``. The first failure ends it (raised here); closing it closes every stream,
    which aborts what is still running in the engine."""
    queue: asyncio.Queue[tuple[int, list[Delta] | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: GenerationRequest) -> None:
        try:
            async with aclosing(_outputs(request, engine, gen)) as outputs:
                async for deltas in outputs:
                    queue.put_nowait((i, deltas))
            queue.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield [dataclasses.replace(d, index=i * n + d.index) for d in item]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _outputs(request: web.Request, engine: ServingEngine,
                   gen: GenerationRequest) -> AsyncGenerator[list[Delta], None]:
    """The engine's outputs for ``gen`` (the first sets the record's TTFT); closing this
    closes the engine's stream, which aborts the request there. Raises ``NotServing``
    at the end when a drain aborted the request."""
    record, gate = request[RECORD], request.app[GATE]
    async with aclosing(gate.generate(engine, gen)) as outputs:
        async for deltas in outputs:
            record.first_output(time.monotonic())
            yield deltas
    gate.raise_if_aborted(gen.request_id)


async def _whole(request: web.Request, answer: Answer, headers: dict[str, str], shape: convert.Shape,
                 head: convert.Head) -> web.Response:
    """Not streamed: one JSON body once the engine is done."""
    acc = answer.accumulator()
    async with aclosing(answer.outputs()) as outputs:
        async for deltas in outputs:
            acc.add(deltas)
    request[RECORD].ended(acc.completion_tokens, acc.finish_summary())
    return web.json_response(shape.body(*head, acc, answer.prompt_tokens), headers=headers)


async def _streamed(request: web.Request, answer: Answer, include_usage: bool, headers: dict[str, str],
                    shape: convert.Shape, head: convert.Head, retry_after: int) -> web.StreamResponse:
    """Streamed: SSE chunks as the engine produces them. The status line waits for the
    engine's first output, so what the engine refuses up front (a schema its grammar cannot
    compile, a prompt it rejects) is answered with its own status. Past the 200 an error is
    one in-band error event and ``[DONE]``; the record says how it ended."""
    record = request[RECORD]
    acc = answer.accumulator()
    async with aclosing(answer.outputs()) as outputs:
        try:
            first = await anext(outputs, None)
        except (ConnectionError, asyncio.CancelledError):
            record.ended(0, "client_gone", status=499)
            raise
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
        await resp.prepare(request)

        async def send(obj: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

        async def write(deltas: list[Delta]) -> None:
            for piece in acc.add(deltas):
                for chunk in shape.delta_chunks(*head, piece):
                    await send(chunk)

        try:
            for chunk in shape.opening(*head, answer.choices):
                await send(chunk)
            if first is not None:
                await write(first)
                async for deltas in outputs:
                    await write(deltas)
            if include_usage:
                await send(convert.usage_chunk(*head, shape.chunk_object, answer.prompt_tokens,
                                               acc.completion_tokens))
            await resp.write(b"data: [DONE]\n\n")
            record.ended(acc.completion_tokens, acc.finish_summary())
        except (ConnectionError, asyncio.CancelledError):
            # aiohttp cancels the handler when the client goes away (handler_cancellation=True)
            record.ended(acc.completion_tokens, "client_gone", status=499)
            raise   # closing the outputs (aclosing above) aborts the engine request
        except Exception as exc:  # the status line is sent: report the error in-band, once
            record.ended(acc.completion_tokens, "error", status=classify(exc, retry_after).status)
            try:
                await resp.write(to_sse_event(exc, retry_after))
                await resp.write(b"data: [DONE]\n\n")
            except ConnectionError:
                pass
    return resp


def _model_card(request: web.Request) -> dict[str, Any]:
    cfg, engine = request.app[CONFIG](), request.app[GATE].engine
    return {"id": cfg.model.name, "object": "model", "created": int(request.app[STARTED_WALL]),
            # the served name, never the model's local path: clients need no file system layout
            "owned_by": "qwenbox", "root": cfg.model.name,
            "max_model_len": engine.max_model_len if engine is not None else cfg.model.max_model_len}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request)]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (the OpenAI client's models.retrieve); ids may contain '/'."""
    _check_model(request.app[CONFIG](), request.match_info["model"])
    return web.json_response(_model_card(request))


# What /health tells a request that is not local (``locality``): whether to send traffic,
# nothing about the processes, versions, paths or load behind it.
PUBLIC_HEALTH = ("status", "ready")


async def health(request: web.Request) -> web.Response:
    body = request.app[HEALTH]()
    status = 200 if body["ready"] else 503
    if not locality.local(request):
        body = {k: body[k] for k in PUBLIC_HEALTH}
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    if not locality.local(request):
        raise errors.forbidden("/metrics is served to this machine only (the unix socket, or loopback without "
                               "a proxy in between)", code="metrics_local_only")
    request.app[ADMISSION].export_metrics()
    payload, content_type = request.app[METRICS].payload()
    resp = web.Response(body=payload)
    resp.headers["Content-Type"] = content_type
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
