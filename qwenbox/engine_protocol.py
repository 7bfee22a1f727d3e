"""The engine seam: what every holder and user of an engine may ask of it.

Contract: ``ServingEngine`` is the whole interface between qwenbox and an inference engine.
``engine.Engine`` (vLLM's AsyncLLM in-process) implements it, and so does the one shared
test double (``tests/fake_engine.py``); nothing else in qwenbox touches an engine except
through these members. ``PromptTokenizer`` is the part the API needs of the model's
tokenizer and chat template. ``EngineOpener`` is how the supervisor builds one.
Both are structural (``typing.Protocol``): an implementation need not inherit from them.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Protocol

import psutil

from .config import Config
from .generation import ChatMessage, Delta, GenerationRequest, Progress, ToolCallDelta

# vLLM's own start-up figures (seconds, token counts) and two facts about how the core started.
FigureValue = float | int | str | bool


class PromptTokenizer(Protocol):
    """The model's tokenizer and chat template, as the API and the warm-up use them."""
    eos_token_id: int | None
    pad_token_id: int
    vocab_size: int

    def encode_within(self, text: str, limit: int) -> list[int] | None: ...

    def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, object]] = ()) -> str:
        """The chat template applied, assistant turn opened; ``tools`` (OpenAI's function
        definitions) rendered as the template renders them."""
        ...

    def encode(self, text: str, *, special: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ToolParser(Protocol):
    """The model's own tool-call format read off one choice's output: ``whole`` for a
    complete answer, ``stream`` delta by delta; each -> (content text, tool-call parts)."""

    def whole(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]: ...

    def stream(self, delta: str, ids: Sequence[int]) -> tuple[str, tuple[ToolCallDelta, ...]]: ...


class ServingEngine(Protocol):
    """One built engine: requests in, deltas out, and the evidence of its life."""
    progress: Progress          # updated on every engine step: the watchdog's evidence
    version: str                # the engine library's version
    device: str

    @property
    def tokenizer(self) -> PromptTokenizer: ...

    @property
    def dead(self) -> bool: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def figures(self) -> dict[str, FigureValue]:
        """Its start-up phases in seconds (``import_s``, ``engine_s``, ...) and the engine's
        own figures (``weights_s``, ``kv_cache_tokens``, ...), rounded."""
        ...

    def generate(self, r: GenerationRequest) -> AsyncGenerator[list[Delta], None]: ...

    def tool_parser(self, tools: list[dict[str, object]]) -> ToolParser | None:
        """A fresh parser for one choice of a request offering ``tools``; None when the
        model has none configured (tool calls are then refused)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def reset_prefix_cache(self) -> None: ...

    async def sleep(self, level: int = 1) -> None: ...

    async def wake_up(self) -> None: ...

    async def close(self, timeout: float = 10.0) -> None: ...

    def core_processes(self) -> list[psutil.Process]: ...

    def core_pids(self) -> list[int]: ...

    def health(self) -> dict[str, object]: ...


class EngineOpener(Protocol):
    """Builds and returns an engine; ``on_step(detail)`` is called between build steps."""

    def __call__(self, cfg: Config, on_step: Callable[[str], None]) -> Awaitable[ServingEngine]: ...
