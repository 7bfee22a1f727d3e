"""Thin handlers: parse -> shape -> convert -> engine -> JSON or SSE.

Contract: handlers never see vllm types and never build error responses themselves
(they raise; middleware maps). A streamed response, once started, ends with
``data: [DONE]`` on success, or with one ``data: {"error": ...}`` event and ``[DONE]`` if
the engine fails mid-stream. A client that goes away aborts its engine request.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from .. import shaping
from . import convert, protocol
from .errors import ApiError, to_sse_event

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no", "Connection": "keep-alive"}


async def read_json(request: web.Request) -> Any:
    limit = request.app["ctx"].cfg.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body is {request.content_length} bytes, above this server's limit "
                            f"of {limit} bytes", code="request_too_large")
    raw = await request.read()   # aiohttp raises 413 past client_max_size for chunked bodies
    return protocol.decode_json(raw)


def _check_model(ctx, model: str) -> None:
    if model not in ctx.model_names:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                            f"'{ctx.cfg.model.name}'", type="invalid_request_error", param="model",
                       code="model_not_found")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app["ctx"]
    req = protocol.parse_chat(await read_json(request), ctx.cfg.limits)
    _check_model(ctx, req.model)
    session = ctx.session_id(request, req.user)
    async with ctx.track(request):
        engine = await ctx.serving_engine()
        tok = engine.tokenizer
        messages = req.messages
        text = shaping.prompt_text(messages)
        shaped = shaping.defaults(ctx.cfg, text, shaping.last_user_text(messages))
        prompt_ids = await _off_loop(len(text), lambda: tok.encode(tok.render_chat(messages)))
        headers = {}
        if ctx.cfg.shaping.on_overlong == "truncate":
            messages, dropped = await _off_loop(len(text), lambda: _fit(
                ctx, tok, messages, prompt_ids, req.sampling.max_tokens, shaped.max_tokens))
            if dropped:
                prompt_ids = await _off_loop(len(text), lambda: tok.encode(tok.render_chat(messages)))
                headers["X-Qwenbox-Truncated"] = f"dropped {dropped} oldest message(s) to fit the context"
                request["qb"]["truncated"] = dropped
                ctx.metrics.truncated.inc()
        return await _admit_and_run(request, ctx, engine, req, prompt_ids, shaped, session, headers, chat=True)


_LARGE_TEXT = 32_768   # characters; tokenizing more than this could stall the event loop


async def _off_loop(size: int, fn):
    """Run CPU-heavy prompt work in a thread when the text is large, so the event loop (health
    probes, other streams, the watchdog's pings) keeps answering during a huge request."""
    return await asyncio.to_thread(fn) if size > _LARGE_TEXT else fn()


def _fit(ctx, tok, messages, prompt_ids, client_max_tokens, shaped_max_tokens):
    """on_overlong = "truncate": drop the oldest turns until prompt + room for the answer fit."""
    max_len = ctx.max_model_len
    room = client_max_tokens if client_max_tokens is not None else min(shaped_max_tokens, max_len // 2)
    budget = max_len - room
    if len(prompt_ids) <= budget:
        return messages, 0
    try:
        return shaping.fit_messages(messages, lambda ms: len(tok.encode(tok.render_chat(ms))), budget)
    except shaping.Overlong as e:
        raise ApiError(400, f"{e}; this model's maximum context length is {max_len} tokens and "
                            f"{room} are kept for the answer", param="messages", code="context_length_exceeded")


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app["ctx"]
    req = protocol.parse_completion(await read_json(request), ctx.cfg.limits)
    _check_model(ctx, req.model)
    session = ctx.session_id(request, req.user)
    async with ctx.track(request):
        engine = await ctx.serving_engine()
        if isinstance(req.prompt, list):
            prompt_ids = req.prompt
            bad = [t for t in prompt_ids if not 0 <= t < engine.tokenizer.vocab_size]
            if bad:
                raise ApiError(400, f"'prompt' has token id {bad[0]} outside the vocabulary "
                                    f"(0..{engine.tokenizer.vocab_size - 1})", param="prompt")
            text = engine.tokenizer.decode(prompt_ids)
        else:
            text = req.prompt
            prompt_ids = await _off_loop(len(text), lambda: engine.tokenizer.encode(text))
        shaped = shaping.defaults(ctx.cfg, text)
        return await _admit_and_run(request, ctx, engine, req, prompt_ids, shaped, session, {}, chat=False)


async def _admit_and_run(request, ctx, engine, req, prompt_ids, shaped, session, headers, *, chat):
    prompt_ids = shaping.pad(prompt_ids, ctx.cfg.shaping.pad_prompt_to, engine.tokenizer.pad_token_id)
    info = request["qb"]
    info.update(session=session, intent=shaped.intent)
    async with ctx.admit(request, len(prompt_ids), session) as ticket:
        info.update(queued_s=round(ticket.queued_s, 4), priority=ticket.priority)
        gen = convert.to_generation(req.sampling, prompt_ids, request_id=request["rid"],
                                    max_model_len=ctx.max_model_len, defaults=shaped,
                                    stream=req.stream, priority=ticket.priority)
        return await _run(request, ctx, engine, gen, req, headers, chat=chat)


async def _run(request, ctx, engine, gen, req, headers: dict, *, chat: bool) -> web.StreamResponse:
    info = request["qb"]
    info.update(prompt_len=len(gen.prompt_token_ids), max_tokens=gen.max_tokens, stream=req.stream)
    rid, created, model = f"{'chatcmpl' if chat else 'cmpl'}-{request['rid']}", convert.now(), req.model
    acc = convert.Accumulator(gen.n)
    t0 = request["t0"]
    if not req.stream:
        async with aclosing(engine.generate(gen)) as outputs:
            async for deltas in outputs:
                if "ttft_s" not in info:
                    info["ttft_s"] = round(time.monotonic() - t0, 4)
                acc.add(deltas)
        ctx.raise_if_aborted(request["rid"])
        _finish(info, acc)
        body = (convert.chat_body if chat else convert.completion_body)(rid, created, model, acc, len(gen.prompt_token_ids))
        return web.json_response(body, headers=headers)

    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    await resp.prepare(request)

    async def send(obj: dict) -> None:
        await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    try:
        if chat:
            for i in range(gen.n):
                await send(convert.chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}))
        async with aclosing(engine.generate(gen)) as outputs:
            async for deltas in outputs:
                if "ttft_s" not in info:
                    info["ttft_s"] = round(time.monotonic() - t0, 4)
                acc.add(deltas)
                for d in deltas:
                    fin = convert.finish_reason(d.finish_reason)
                    if chat:
                        if d.text:
                            await send(convert.chat_chunk(rid, created, model, d.index, {"content": d.text}))
                        if fin:
                            await send(convert.chat_chunk(rid, created, model, d.index, {}, fin))
                    elif d.text or fin:
                        await send(convert.completion_chunk(rid, created, model, d.index, d.text, fin))
        ctx.raise_if_aborted(request["rid"])
        if req.include_usage:
            await send(convert.usage_chunk(rid, created, model, "chat.completion.chunk" if chat else "text_completion",
                                           len(gen.prompt_token_ids), acc.completion_tokens))
        await resp.write(b"data: [DONE]\n\n")
        _finish(info, acc)
    except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
        # aiohttp cancels the handler when the client goes away (handler_cancellation=True)
        info.update(status=499, finish="client_gone", output_len=acc.completion_tokens)
        raise   # aclosing() above already aborted the engine request
    except Exception as exc:  # the status line is sent: report the error in-band, once
        err = to_sse_event(exc)
        info.update(status=ctx.error_status(exc), finish="error", output_len=acc.completion_tokens)
        ctx.on_stream_error(exc)
        try:
            await resp.write(err)
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:
            pass
    return resp


def _finish(info: dict, acc: convert.Accumulator) -> None:
    info["output_len"] = acc.completion_tokens
    info["finish"] = ",".join(sorted({f or "stop" for f in acc.finish}))


def _model_card(ctx) -> dict:
    return {"id": ctx.cfg.model.name, "object": "model", "created": int(ctx.started_wall), "owned_by": "qwenbox",
            "root": ctx.cfg.model.path, "max_model_len": ctx.max_model_len}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app["ctx"])]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (the OpenAI client's models.retrieve); ids may contain '/'."""
    ctx = request.app["ctx"]
    _check_model(ctx, request.match_info["model"])
    return web.json_response(_model_card(ctx))


async def health(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    body = ctx.health()
    return web.json_response(body, status=200 if body["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    payload, content_type = ctx.metrics_payload()
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
