"""The one test double of the engine seam (``qwenbox.engine_protocol.ServingEngine``).

For the pure state-machine tests of the gate, the watchdog, the standby and the supervisor;
every feature is also tested on the real vLLM engine elsewhere. ``FakeEngine`` streams
``outputs`` (one ``Delta`` each) for every request, can die (``die_after``: ``EngineDead``
after that many outputs, or ``kill()``), records what it was asked (``calls``), and its
"core processes" are whatever real processes a test hands it.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import psutil

from qwenbox.config import Config
from qwenbox.engine import EngineDead
from qwenbox.engine_protocol import FigureValue, PromptTokenizer, ServingEngine
from qwenbox.generation import ChatMessage, Delta, GenerationRequest, Progress


class CharTokenizer:
    """One token per character (code point), a ChatML-like chat rendering."""
    eos_token_id: int | None = 0
    pad_token_id: int = 0
    vocab_size: int = 0x110000

    def encode_within(self, text: str, limit: int) -> list[int] | None:
        return None if len(text) > limit else self.encode(text)

    def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, object]] = ()) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


class FakeEngine:
    def __init__(self, outputs: Sequence[str] = ("a", "b"), die_after: int | None = None,
                 procs: Sequence[psutil.Process] = (), max_model_len: int = 4096,
                 kv_cache_tokens: int = 65_536) -> None:
        self.outputs = list(outputs)
        self.die_after = die_after
        self.procs = list(procs)
        self.progress = Progress()
        self.tokenizer: PromptTokenizer = CharTokenizer()
        self.version = "fake"
        self.device = "cpu"
        self.calls: list[tuple[str, object]] = []
        self.closed = False
        self._dead = False
        self._max_model_len = max_model_len
        self.kv_cache_tokens = kv_cache_tokens

    # ------------------------------------------------------------ the test's levers
    def kill(self) -> None:
        self._dead = True

    @property
    def generated(self) -> int:
        return sum(1 for c in self.calls if c[0] == "generate")

    # ------------------------------------------------------------ ServingEngine
    @property
    def dead(self) -> bool:
        return self._dead or self.closed

    @dead.setter
    def dead(self, value: bool) -> None:
        self._dead = value

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def block_size(self) -> int:
        return 16

    def figures(self) -> dict[str, FigureValue]:
        return {"import_s": 0.0, "engine_s": 0.0, "kv_cache_tokens": self.kv_cache_tokens}

    async def generate(self, r: GenerationRequest) -> AsyncGenerator[list[Delta], None]:
        self.calls.append(("generate", r.request_id))
        for i, text in enumerate(self.outputs):
            if self._dead or (self.die_after is not None and i >= self.die_after):
                self._dead = True
                raise EngineDead("engine core died")
            await asyncio.sleep(0)
            last = i == len(self.outputs) - 1
            yield [Delta(index=0, text=text, num_tokens=1, finish_reason="length" if last else None)]
        if self.die_after is not None and self.die_after >= len(self.outputs):
            self._dead = True
            raise EngineDead("engine core died")

    def tool_parser(self, tools: list[dict[str, object]]) -> None:
        return None         # the double has no tool-call format: tool calls are refused

    async def abort(self, request_id: str) -> None:
        self.calls.append(("abort", request_id))

    async def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache", None))

    async def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    async def wake_up(self) -> None:
        self.calls.append(("wake", None))

    async def close(self, timeout: float = 10.0) -> None:
        self.closed = True
        self.calls.append(("close", None))

    def core_processes(self) -> list[psutil.Process]:
        return list(self.procs)

    def core_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def health(self) -> dict[str, object]:
        return {"engine": {"device": self.device, "vllm": self.version}}


class FakeOpener:
    """An ``EngineOpener`` that hands out the given engines in turn (a new default one after
    those), or raises ``fail`` on the build numbered ``fail_on`` (1-based)."""

    def __init__(self, *engines: FakeEngine, fail: BaseException | None = None, fail_on: int = 0) -> None:
        self.queue = list(engines)
        self.built: list[FakeEngine] = []
        self.fail, self.fail_on = fail, fail_on
        self.release: asyncio.Event | None = None     # set by a test: builds wait for it
        self.started = 0                               # builds begun

    async def __call__(self, cfg: Config, on_step: object) -> ServingEngine:
        self.started += 1
        if self.release is not None:
            await self.release.wait()
        if self.fail is not None and len(self.built) + 1 == self.fail_on:
            self.built.append(FakeEngine())
            raise self.fail
        engine = self.queue.pop(0) if self.queue else FakeEngine()
        self.built.append(engine)
        return engine


def _conforms(e: FakeEngine) -> ServingEngine:    # mypy checks the double against the seam
    return e
