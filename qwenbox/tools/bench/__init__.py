"""``qwenbox bench``: benchmarks that print tables and write JSON (they are not tests).

Contract:
- ``qwenbox bench startup`` (``startup.py``): cold-start phases, first-request TTFT
  with and without pre-warm, our API's overhead over AsyncLLM called in-process, and
  launch-to-ready of ``qwenbox serve`` vs vLLM's own OpenAI server.
- ``qwenbox bench load`` (``load.py``): the cost benchmark - a concurrency sweep, a
  prompt-length mix and a burst against one daemon, or ``--compare A B [C [D]]``.
- ``qwenbox bench`` with no mode runs both, one after the other; the options of both are
  checked before either starts.
Every figure comes from runs made side by side in one invocation; ratios are only ever
taken between such runs. Each run sends a fixed number of requests, each with a client
timeout, at a concurrency capped by ``workload.MAX_CONCURRENCY``, and only to a unix
socket: one it started, or ``--socket``. Servers are started one at a time and always
stopped, also on Ctrl-C.

This module holds the command line only; ``startup`` and ``load`` are imported when they
run (never by ``qwenbox serve``), and neither imports this one.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Protocol


class _Mode(Protocol):
    """What ``run`` calls of a mode's module (``startup``, ``load``)."""

    def validate(self, args: argparse.Namespace) -> object: ...

    def main(self, args: argparse.Namespace) -> int: ...


# ------------------------------------------------------------------ CLI
def add_arguments(p: Any) -> None:
    """``qwenbox bench`` options (cli.py builds the parser, this fills it)."""
    from ...config import DEFAULT_CONFIG_PATH
    from .workload import DEFAULT_GPU_HOUR_COST, GPU_HOUR_COST_SOURCE

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
    p.add_argument("--tokenizer", help="the served model's tokenizer (dir or HF id) for the prompt check "
                                       "(default: the config's model.tokenizer or model.path)")

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
    ld.add_argument("--compare", nargs="+", metavar="CONFIG|vllm-defaults",
                    help="2-4 entries, run one after the other: a daemon per config, or `vllm serve MODEL` with "
                         "its defaults (vllm-defaults, the first config's model); print each over the first")
    ld.add_argument("--prompt-kind", choices=("ids", "text"), default="ids",
                    help="ids (default): /v1/completions with prompts of random token ids, lengths in tokens; "
                         "text: chat requests of synthetic words, lengths in words")
    ld.add_argument("--levels", default="1,2,4,8",
                    help="stepped concurrency sweep levels, ascending (default 1,2,4,8); it stops after the "
                         "first unstable level")
    ld.add_argument("--per-level", type=int, default=24,
                    help="requests per sweep level, at least 2 x the level (default 24)")
    ld.add_argument("--sweep-words", type=int, default=96,
                    help="prompt length of sweep requests: tokens with --prompt-kind ids, else words (default 96)")
    ld.add_argument("--p95-bound", type=float, default=10.0,
                    help="a level is stable when under 1%% of its requests fail and its P95 end-to-end latency "
                         "is at most this many seconds (default 10)")
    ld.add_argument("--mix", default="short:16:0.5,medium:128:0.35,long:512:0.15",
                    help="synthetic prompt mix NAME:LENGTH:WEIGHT,... (tokens or words, see --prompt-kind; "
                         "default %(default)s)")
    ld.add_argument("--prompts", metavar="FILE.jsonl",
                    help='prompt mix from a JSONL file: {"prompt": ...} or {"messages": [...]}, '
                         'optional "max_tokens"; replaces --mix')
    ld.add_argument("--mix-requests", type=int, default=48, help="requests in the mix phase (default 48)")
    ld.add_argument("--mix-concurrency", type=int, default=0,
                    help="concurrency of the mix phase (default 0: the highest stable sweep level)")
    ld.add_argument("--burst", type=int, default=None,
                    help="requests sent at once in the burst (default: --burst-factor x the highest stable "
                         "level; 0 skips)")
    ld.add_argument("--burst-factor", type=int, default=10,
                    help="the default burst, as a multiple of the highest stable level (default 10)")
    ld.add_argument("--phase-time-limit", type=float, default=120.0,
                    help="no new request starts in a phase after this many seconds (default 120)")
    ld.add_argument("--gpu-hour-cost", type=float, default=DEFAULT_GPU_HOUR_COST,
                    help=f"price of one GPU hour in $ for cost per request (default {DEFAULT_GPU_HOUR_COST}: "
                         f"{GPU_HOUR_COST_SOURCE})")


def run(args: Any) -> int:
    """Check the options of every mode that will run (exit status 2 and one line when one
    is bad), then run the modes in order; the first non-zero exit status ends the run."""
    from . import load, startup
    from .workload import OptionError

    every: tuple[tuple[str, _Mode], ...] = (("startup", startup), ("load", load))
    modes = [(name, m) for name, m in every if args.mode in (name, "all")]
    for name, m in modes:
        try:
            m.validate(args)
        except OptionError as e:
            print(f"qwenbox bench {name}: {e}", flush=True)
            return 2
    for _, m in modes:
        rc = m.main(args)
        if rc:
            return rc
    return 0
