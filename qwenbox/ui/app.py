"""The Chainlit handlers: one chat = one session id and one history, one message = one API call.

Run by ``qwenbox ui`` (``chainlit run`` on this file, in the UI environment); the only
module that imports chainlit. What the person sees:
- a message shorter than ``stream_below_chars`` streams in pieces (deltas batched into one
  page update per ``flush_interval_s``); a longer one shows a "Thinking" indicator that
  the whole answer then replaces;
- while the model starts (or is at capacity) a notice says so and counts the retries; it
  goes away when the answer comes; the page never needs a reload;
- bad input, an over-long conversation, a failure: one friendly sentence, never a trace;
- when old turns no longer fit the context, a note says how many the model did not see.
The history kept here is what the model saw: a failed turn is not added (send it again).
"""
from __future__ import annotations

import logging
import uuid

import chainlit as cl

from qwenbox.ui import textcheck
from qwenbox.ui.batcher import Batcher
from qwenbox.ui.client import ChatClient, ChatFailure, WaitInfo, fit_body, friendly
from qwenbox.ui.settings import Settings

log = logging.getLogger("qwenbox.ui")
SETTINGS = Settings.from_env()
CLIENT = ChatClient(SETTINGS)

THINKING = "*Thinking…* (a long message is answered in one piece)"
STARTING = ("**The model is starting.** Your message will be answered as soon as it is ready "
            "(retry {n}, next in {s:.0f} s).")
BUSY = "**The model is busy.** Your message waits for a free place (retry {n}, next in {s:.0f} s)."


def _new_history() -> list[dict[str, str]]:
    return [{"role": "system", "content": SETTINGS.system_prompt}] if SETTINGS.system_prompt else []


@cl.on_chat_start
async def start() -> None:
    # X-Session-Id allows 1-128 of [A-Za-z0-9._:@-]: "ui-" + 32 hex digits.
    cl.user_session.set("session_id", f"ui-{uuid.uuid4().hex}")
    cl.user_session.set("history", _new_history())


async def _say(text: str) -> None:
    await cl.Message(content=text, author=SETTINGS.title).send()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    text = message.content
    if getattr(message, "elements", None):
        await _say("Attachments are not supported here: please paste the text into the message.")
        return
    problem = textcheck.problem(text, SETTINGS.max_message_chars)
    if problem:
        await _say(problem)
        return
    history: list[dict[str, str]] = cl.user_session.get("history") or _new_history()
    session_id: str = cl.user_session.get("session_id") or f"ui-{uuid.uuid4().hex}"
    try:
        await _turn(text, history, session_id)
    except ChatFailure as f:
        await _say(f.message)
    except Exception as e:                         # never a trace on the page; the log has it
        log.exception("chat turn failed")
        await _say(friendly(e).message)


async def _turn(text: str, history: list[dict[str, str]], session_id: str) -> None:
    messages, left_out = fit_body([*history, {"role": "user", "content": text}], SETTINGS.max_body_bytes)
    stream = len(text) < SETTINGS.stream_below_chars
    notice: cl.Message | None = None

    async def on_wait(w: WaitInfo) -> None:
        nonlocal notice
        body = (BUSY if w.reason == "busy" else STARTING).format(n=w.attempt, s=w.delay_s)
        if notice is None:
            notice = cl.Message(content=body, author=SETTINGS.title)
            await notice.send()
        else:
            notice.content = body
            await notice.update()

    answer = cl.Message(content="", author=SETTINGS.title)
    thinking = None
    try:
        if stream:
            batcher = Batcher(answer.stream_token, SETTINGS.flush_interval_s)
            try:
                reply = await CLIENT.reply(messages, session_id, stream=True, on_delta=batcher.add, on_wait=on_wait)
            except ChatFailure:
                if answer.streaming:            # end the half-shown answer; the failure is said next
                    await batcher.close()
                    await answer.send()
                raise
            await batcher.close()
            if not reply.text:
                answer.content = "*(the model gave an empty answer)*"
            await answer.send()
        else:
            thinking = cl.Message(content=THINKING, author=SETTINGS.title)
            await thinking.send()
            reply = await CLIENT.reply(messages, session_id, stream=False, on_wait=on_wait)
            thinking.content = reply.text or "*(the model gave an empty answer)*"
            await thinking.update()
            thinking = None
    finally:
        if notice is not None:
            await notice.remove()
        if thinking is not None:               # failed or stopped: the indicator must not stay
            await thinking.remove()
    dropped = left_out + reply.truncated
    kept = _drop_oldest(messages, reply.truncated)
    kept.append({"role": "assistant", "content": reply.text})
    cl.user_session.set("history", kept)
    if dropped:
        await _say(f"Note: this chat is longer than the model can read at once: the {dropped} oldest "
                   f"message(s) were left out of this answer. Start a new chat for a fresh context.")


def _drop_oldest(messages: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """What the server's truncation kept: the ``n`` oldest non-system messages go (shaping.fit_messages)."""
    out = list(messages)
    for _ in range(n):
        i = next((i for i, m in enumerate(out[:-1]) if m["role"] != "system"), None)
        if i is None:
            break
        del out[i]
    return out
