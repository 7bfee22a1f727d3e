"""Tool calls in a chat answer: what the engine is asked for, and how its output is read.

Contract:
- ``guided(tools)``: a forced call (``tool_choice`` "required", or a named function) is
  generated under a JSON schema, as vLLM's own server does it: the named function's
  parameters, or an array of ``{"name", "parameters"}`` for "required" (one item at most
  when ``parallel_tool_calls`` is false). "auto" generates freely in the model's own format.
- ``ToolCalling.read(outputs)`` wraps an answer's delta stream: each ``Delta``'s text is
  split into content and ``tool_calls`` parts (``ToolCallDelta``), by the engine's parser of
  the model's format for "auto" (``ServingEngine.tool_parser``), or from the JSON the grammar
  forced, once the choice ends, for a forced call. A choice that called a tool and stopped
  finishes with "tool_calls". Token counts and logprobs pass through untouched.
- Output that does not parse as the call it should be (an answer cut by ``max_tokens``)
  is given back as content, never dropped.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from ..engine_protocol import ToolParser
from ..generation import Delta, Guided, ToolCallDelta
from .errors import bad_request
from .protocol import Tools


def guided(tools: Tools) -> Guided | None:
    """The constraint a forced call is generated under; None for "auto" and "none"."""
    by_name = {d["function"]["name"]: d["function"].get("parameters") or {"type": "object"}
               for d in tools.definitions}
    if tools.forced is not None:
        return Guided(json_schema=json.dumps(by_name[tools.forced], separators=(",", ":")))
    if tools.choice != "required":
        return None
    item = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                        "parameters": params},
                       "required": ["name", "parameters"]} for name, params in by_name.items()]}
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
    if not tools.parallel:
        schema["maxItems"] = 1
    return Guided(json_schema=json.dumps(schema, separators=(",", ":")))


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def forced_calls(tools: Tools, text: str) -> tuple[ToolCallDelta, ...]:
    """The calls a forced answer's JSON holds; () when it is not that JSON (cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return ()
    if tools.forced is not None:
        return (ToolCallDelta(0, _call_id(), tools.forced, json.dumps(value, ensure_ascii=False)),) \
            if isinstance(value, dict) else ()
    if not isinstance(value, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in value):
        return ()
    return tuple(ToolCallDelta(i, _call_id(), c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
                 for i, c in enumerate(value))


class ToolCalling:
    """Reads one chat answer's tool calls (see the module's contract). ``parser()`` makes
    a fresh parser of the model's format, one per choice."""

    def __init__(self, tools: Tools, parser: Callable[[], ToolParser | None], stream: bool) -> None:
        """A 400 when "auto" needs a parser of the model's format and the model has none."""
        self.tools = tools
        self._stream = stream
        self._forced = tools.forced is not None or tools.choice == "required"
        self._parsers: dict[int, ToolParser] = {}
        self._texts: dict[int, str] = {}        # a forced call's JSON so far, by choice
        self._called: set[int] = set()          # choices that produced a tool call
        if not self._forced:
            first = parser()
            if first is None:
                raise bad_request("this server has no tool-call parser for its model (model.tool_parser is empty), "
                                  "so it cannot read tool calls; send tool_choice \"none\", \"required\" or a "
                                  "named function", param="tools", code="unsupported_parameter")
            self._parsers[0] = first
            self._new_parser: Callable[[], ToolParser] = lambda: parser() or first

    async def read(self, outputs: AsyncGenerator[list[Delta], None]) -> AsyncGenerator[list[Delta], None]:
        """``outputs`` with each delta split; closing this closes ``outputs`` (the engine's abort)."""
        async with aclosing(outputs):
            async for deltas in outputs:
                yield [self._split(d) for d in deltas]

    def _split(self, d: Delta) -> Delta:
        i = d.index
        if self._forced:
            text = self._texts.get(i, "") + d.text
            self._texts[i] = text
            if d.finish_reason is None:
                return dataclasses.replace(d, text="")
            calls = forced_calls(self.tools, text)
            content = "" if calls else text
        else:
            parser = self._parsers.get(i)
            if parser is None:
                parser = self._parsers[i] = self._new_parser()
            content, calls = parser.stream(d.text, d.token_ids) if self._stream else parser.whole(d.text)
        if not self.tools.parallel:
            calls = tuple(c for c in calls if c.index == 0)
        if calls:
            self._called.add(i)
        finish = d.finish_reason
        if finish == "stop" and i in self._called:
            finish = "tool_calls"
        return dataclasses.replace(d, text=content, tool_calls=calls, finish_reason=finish)
