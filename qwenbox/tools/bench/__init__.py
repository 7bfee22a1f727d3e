"""``qwenbox bench``: benchmarks that print a table and write JSON (they are not tests).

Contract:
- ``qwenbox bench startup`` (``startup.py``): cold-start phases, first-request TTFT
  with and without pre-warm, our API's overhead over AsyncLLM called in-process, and
  launch-to-ready of ``qwenbox serve`` vs vLLM's own OpenAI server.
- ``qwenbox bench load`` (``load.py``): the cost benchmark - a concurrency sweep, a
  prompt-length mix and a burst against one daemon, or ``--compare A.toml B.toml``.
- ``qwenbox bench`` with no mode runs both, one after the other.
Every figure comes from runs made side by side in one invocation; ratios are only ever
taken between such runs. Load is always bounded (request counts, per-phase time limits,
a per-request timeout) and goes only to a unix socket: one we started, or ``--socket``.
Servers are started one at a time and always stopped, also on Ctrl-C.

This module holds what both benchmarks share: percentiles, the streaming client, the
server process runner, table printing and JSON output. It never imports vllm.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

# Words the demo model's tokenizer knows (~1.35 tokens per word there); any model's
# tokenizer handles them. Prompt lengths are given in words; real token counts are
# read back from the server's usage figures and reported.
WORDS = ("the quick brown fox jumps over lazy dog you are a helpful assistant answer question "
         "briefly and precisely summarize following text in one sentence what is capital of "
         "france paris explain how transformer language model generates token by gpu memory kv "
         "cache prefix caching batching latency inference costs write short poem about sea wind "
         "morning light").split()

HARD_MAX_CONCURRENCY = 512      # no option can push more requests at once than this
HARD_MAX_REQUESTS = 20000       # nor more requests in one phase


# ------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100), linear interpolation between order statistics."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Iterable[float | None]) -> dict[str, Any]:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "min": None, "max": None}
    return {"n": len(xs), "p50": percentile(xs, 50), "p95": percentile(xs, 95), "p99": percentile(xs, 99),
            "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# ------------------------------------------------------------------ formatting
def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    if isinstance(v, float):
        if unit == "s":
            return f"{v * 1000:.1f} ms" if abs(v) < 1 else f"{v:.2f} s"
        if unit == "x":
            return f"{v:.2f}x"
        if unit == "%":
            return f"{v * 100:.1f}%"
        if unit == "$":
            return f"${v:.4g}"
        if abs(v) >= 1000:
            return f"{v:,.0f}{unit}"
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = [title] if title else []
    line = "  ".join("-" * w for w in widths)
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append(line)
    return "\n".join(out)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return p


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def default_out(kind: str) -> Path:
    return Path("bench-results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def machine() -> dict[str, Any]:
    import platform
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / (1 << 30), 1)
    except Exception:  # pragma: no cover - psutil is a dependency
        pass
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def busy_note() -> str | None:
    """Other work on the machine skews every timing here: say so when it is there."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    if load1 > 0.5 * cpus:
        return (f"note: load average {load1:.2f} on {cpus} CPUs before the run: other work is running, "
                f"timings will be noisy")
    return None


def finish(res: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------ prompts
def synthetic_text(words: int, salt: str, rng: random.Random) -> str:
    """``salt`` first, so prompts never share a cached prefix beyond the chat template."""
    return f"{salt}: " + " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


# ------------------------------------------------------------------ one streamed request
@dataclass
class Result:
    """One request as the client saw it. Times are seconds since the request was sent."""
    ok: bool = False
    status: int | None = None        # HTTP status; None when no status line came back
    failure: str | None = None       # None when ok; else "429", "503", "timeout", "stream_error", ...
    error_code: str | None = None    # OpenAI error `code` (the 429 reason, for instance)
    ttft_s: float | None = None      # to the first non-empty content chunk
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)   # gaps between content chunks
    prompt_tokens: int | None = None
    output_tokens: int = 0
    tag: str = ""                    # which prompt class / phase, for breakdowns
    started: float = 0.0             # monotonic send time


async def stream_chat(session: Any, body: dict[str, Any], timeout_s: float, tag: str = "",
                      request_id: str | None = None) -> Result:
    """POST one streaming chat completion and time it client-side. ``request_id`` goes out
    as X-Request-Id, so the server's own log line for it can be found afterwards."""
    import aiohttp

    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    r = Result(tag=tag)
    t0 = r.started = time.monotonic()
    last: float | None = None
    chunks = 0
    done = False
    try:
        async with session.post("http://localhost/v1/chat/completions", json=body,
                                headers={"X-Request-Id": request_id} if request_id else None,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            r.status = resp.status
            if resp.status != 200:
                raw = await resp.read()
                r.failure = str(resp.status)
                r.error_code = _error_code(raw)
                r.e2e_s = time.monotonic() - t0
                return r
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                now = time.monotonic()
                if payload == b"[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(payload)
                except ValueError:
                    continue
                if "error" in obj:
                    r.failure = "stream_error"
                    r.error_code = _error_code(payload)
                    continue
                if obj.get("usage"):
                    r.prompt_tokens = obj["usage"].get("prompt_tokens")
                    r.output_tokens = obj["usage"].get("completion_tokens") or r.output_tokens
                for ch in obj.get("choices") or ():
                    if (ch.get("delta") or {}).get("content"):
                        chunks += 1
                        if r.ttft_s is None:
                            r.ttft_s = now - t0
                        elif last is not None:
                            r.itl_s.append(now - last)
                        last = now
            r.e2e_s = time.monotonic() - t0
            if not r.output_tokens:
                r.output_tokens = chunks
            if r.failure is None and not done:
                r.failure = "incomplete_stream"
            r.ok = r.failure is None
    except asyncio.TimeoutError:
        r.failure, r.e2e_s = "timeout", time.monotonic() - t0
    except aiohttp.ClientError as e:
        r.failure, r.e2e_s = "connection_error", time.monotonic() - t0
        r.error_code = type(e).__name__
    return r


def _error_code(raw: bytes) -> str | None:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(err, dict):
        return err.get("code") or err.get("type")
    return None


def unix_session(sock: str, limit: int = 0) -> Any:
    """An aiohttp session whose every request goes to the unix socket ``sock``."""
    import aiohttp
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock, limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=None))


# ------------------------------------------------------------------ plain HTTP (sync) over a unix socket
class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix stream socket (also used by the test helpers)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def get_json(sock: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    conn = UnixHTTPConnection(sock, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else None
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


# ------------------------------------------------------------------ server processes
class ServerError(RuntimeError):
    pass


def _package_env() -> dict[str, str]:
    """Children must import this very qwenbox, installed or run from a checkout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Server:
    """A server process we start, on a unix socket in a private temp dir, always stopped.

    ``launch_to_listen_s``: first answer of any status on /health; ``launch_to_ready_s``:
    first 200 on /health (qwenbox: after warm-up; vLLM: engine up).
    """

    def __init__(self, name: str, argv: list[str], sock: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.sock, self.log_path = name, argv, sock, log_path
        self.env = env or _package_env()
        self.proc: subprocess.Popen | None = None
        self.t_launch = 0.0
        self.launch_to_listen_s: float | None = None
        self.launch_to_ready_s: float | None = None
        self.health: Any = None
        self._log: Any = None

    @classmethod
    def qwenbox(cls, name: str, config: str, sock: str, log_path: Path, no_warmup: bool = False) -> "Server":
        argv = [sys.executable, "-m", "qwenbox", "serve", "--config", str(config), "--socket", sock]
        if no_warmup:
            argv.append("--no-warmup")
        return cls(name, argv, sock, log_path)

    def start(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.t_launch = time.monotonic()
        # Its own process group, so a forced stop takes the engine-core children too. NOT its
        # own session: with the kernel's autogroup scheduling (sched_autogroup_enabled=1) a
        # new session is a new scheduling group, and on the 2-core dev VM that starved this
        # client for whole requests (a streamed answer read in one piece at the end in 60 of
        # 60 requests, vs 0 of 60 in the same session).
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL, process_group=0)
        return self

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.1) -> "Server":
        deadline = self.t_launch + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                  f"log: {self.log_path}\n{self.tail()}")
            try:
                status, body = get_json(self.sock, "/health", timeout=5)
            except (OSError, http.client.HTTPException):
                time.sleep(poll)
                continue
            now = time.monotonic()
            if self.launch_to_listen_s is None:
                self.launch_to_listen_s = now - self.t_launch
            if status == 200:
                self.launch_to_ready_s = now - self.t_launch
                self.health = body
                return self
            time.sleep(poll)
        raise ServerError(f"{self.name} not ready after {timeout:.0f} s; log: {self.log_path}\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        # Engine-core children left behind by a crash share the session we created.
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return p.returncode


@contextlib.contextmanager
def running(server: Server, ready_timeout: float = 600.0) -> Iterator[Server]:
    try:
        server.start().wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A short private directory for sockets (unix socket paths are limited to ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="qwenbox-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def served_model(sock: str) -> tuple[str, int | None]:
    """(model id, max_model_len) as the server at ``sock`` announces them."""
    status, body = get_json(sock, "/v1/models")
    if status != 200 or not body or not body.get("data"):
        raise ServerError(f"GET /v1/models answered {status}")
    m = body["data"][0]
    return m["id"], m.get("max_model_len")


def server_side(log_path: Path, ids: Sequence[str], key: str = "ttft_s") -> list[float | None]:
    """``key`` of qwenbox's own ``request`` log lines for these request ids, in order."""
    from ...eventlog import parse_line
    from ..logs import normalize

    found: dict[str, Any] = {}
    want = set(ids)
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                rec = parse_line(line)
                if rec and rec.get("event") == "request" and rec.get("id") in want:
                    found[rec["id"]] = normalize(rec).get(key)
    except OSError:
        pass
    return [found.get(i) if isinstance(found.get(i), (int, float)) else None for i in ids]


def log_dir_for(out: Path) -> Path:
    return out.with_name(out.stem + "-logs")


def out_path(args: Any, kind: str) -> Path:
    """--out, or a time-stamped file under bench-results/; ``all`` writes one file per kind."""
    if not args.out:
        return default_out(kind)
    p = Path(args.out)
    if getattr(args, "mode", kind) == "all":
        p = p.with_name(f"{p.stem}-{kind}{p.suffix or '.json'}")
    return p


# ------------------------------------------------------------------ CLI
def add_arguments(p: Any) -> None:
    """``qwenbox bench`` options (cli.py builds the parser, this fills it)."""
    from ...config import DEFAULT_CONFIG_PATH

    p.add_argument("mode", nargs="?", choices=("startup", "load", "all"), default="all",
                   help="startup: cold start, pre-warm, API overhead, launch-to-ready vs vLLM; "
                        "load: the cost benchmark; all (default): both")
    p.add_argument("--config", "-c", default=os.environ.get("QWENBOX_CONFIG", DEFAULT_CONFIG_PATH),
                   help=f"TOML config of the daemon(s) to start (default: {DEFAULT_CONFIG_PATH})")
    p.add_argument("--out", "-o", help="JSON output file (default: bench-results/<mode>-<time>.json; "
                                       "server logs go beside it in <name>-logs/)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic prompts (default 0)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to be ready")
    p.add_argument("--request-timeout", type=float, default=120.0, help="client timeout per request (s)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")

    s = p.add_argument_group("startup")
    s.add_argument("--after-ready", type=int, default=20,
                   help="requests after the first one, for the first-vs-median TTFT ratio (default 20)")
    s.add_argument("--prompt-words", type=int, default=96, help="user prompt length in words (default 96)")
    s.add_argument("--throughput-requests", type=int, default=128,
                   help="requests in the API-vs-in-process throughput run (default 128)")
    s.add_argument("--throughput-concurrency", type=int, default=8, help="their concurrency (default 8)")
    s.add_argument("--throughput-repeats", type=int, default=3,
                   help="repetitions of the throughput run per path; the median one is reported (default 3)")
    s.add_argument("--skip-vllm", action="store_true", help="do not start vLLM's own OpenAI server")

    ld = p.add_argument_group("load")
    ld.add_argument("--socket", help="drive the daemon already listening here instead of starting one")
    ld.add_argument("--compare", nargs=2, metavar=("A.toml", "B.toml"),
                    help="start a daemon with A, run the load, stop it; the same with B; print B/A ratios")
    ld.add_argument("--levels", default="1,2,4,8", help="concurrency sweep levels (default 1,2,4,8)")
    ld.add_argument("--per-level", type=int, default=24, help="requests per sweep level (default 24)")
    ld.add_argument("--sweep-words", type=int, default=96, help="prompt length of sweep requests, words")
    ld.add_argument("--mix", default="short:16:0.5,medium:128:0.35,long:512:0.15",
                    help="synthetic prompt mix NAME:WORDS:WEIGHT,... (default %(default)s)")
    ld.add_argument("--prompts", metavar="FILE.jsonl",
                    help='prompt mix from a JSONL file: {"prompt": ...} or {"messages": [...]}, '
                         'optional "max_tokens"; replaces --mix')
    ld.add_argument("--mix-requests", type=int, default=48, help="requests in the mix phase (default 48)")
    ld.add_argument("--mix-concurrency", type=int, default=0,
                    help="concurrency of the mix phase (default 0: the sweep's best level)")
    ld.add_argument("--burst", type=int, default=64, help="requests sent at once in the burst (default 64; 0 skips)")
    ld.add_argument("--phase-time-limit", type=float, default=120.0,
                    help="no new request starts in a phase after this many seconds (default 120)")
    ld.add_argument("--gpu-hour-cost", type=float, default=1.0,
                    help="price of one hour of the machine, for cost per request (default 1.0)")


def run(args: Any) -> int:
    if args.mode in ("startup", "all"):
        from . import startup
        rc = startup.main(args)
        if rc or args.mode == "startup":
            return rc
    from . import load
    return load.main(args)
