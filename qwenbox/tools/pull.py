"""``qwenbox pull [MODEL]``: download a Hugging Face model into ``model.models_dir``, verified.

Contract:
- MODEL (default: the config's ``model.path``) is a hub id; it lands in
  ``<models_dir>/<org>/<name>`` (``models.pulled_dir``), the directory ``serve`` loads.
- Only what vLLM loads is fetched: top-level config/tokenizer/generation files and the
  ``*.safetensors`` weights with their index (``*.bin`` only for a repo without safetensors).
- Each file is fetched with huggingface_hub's own calls (``HF_ENDPOINT``, ``HF_TOKEN``, its
  redirects, retries and progress bars - on a terminal - as it does them) into
  ``.cache/qwenbox-pull/<file>.<hash>.part`` in that directory and renamed into place when
  complete. A later pull resumes a part with a Range request: huggingface_hub's own
  ``snapshot_download`` (2.x) resumes only within one process and deletes partial files when
  it fails, which for a model of many GiB means starting the shard over.
- Then every file is checked against the hub's tree listing of the resolved commit: size, and
  sha256 (LFS files) or the git blob sha1 (the others). huggingface_hub itself only checks
  sizes. A file that does not match is deleted (so the next pull fetches it again) and the
  pull fails. Only after all match is ``models.MARKER`` written (temp file, fsync, rename):
  until then ``serve`` and ``check-config`` refuse the model.
- One pull at a time per model directory (a lock in its ``.cache``); a second one fails at once.
- Run as root while ``models_dir`` belongs to another user (the package's ``qwenbox``),
  everything the pull wrote (finished or not) is handed to that user and group at the end.
- Failures are one line on stderr and an ``ExitCode``: NO_MODEL (no such repo or revision,
  or gated without a token), DOWNLOAD_FAILED (network, hub, disk: run again to resume),
  BAD_DOWNLOAD (checksum mismatch), USAGE (MODEL is a local path), CONFIG.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, Protocol, TypedDict
from urllib.parse import urlsplit

from .. import models
from ..config import DEFAULT_CONFIG_PATH, load
from ..exitcode import ExitCode
from ..fileio import write_atomic

if TYPE_CHECKING:                    # huggingface_hub is imported where a pull runs, not before
    from huggingface_hub.hf_api import RepoFile

# What vLLM reads from a model directory (top level only: subfolders such as onnx/ or
# original/ hold other formats of the same weights).
WANTED = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
          "LICENSE*")
WEIGHTS_FALLBACK = ("*.bin",)        # PyTorch weights, only for a repo that has no safetensors
_CHUNK = 1 << 20
PARTS = Path(".cache") / "qwenbox-pull"   # unfinished files, inside the model's directory


# One verified file in the marker: its hash under the name of its algorithm (LFS files: sha256,
# the others: the git blob sha1).
FileRecord = TypedDict("FileRecord", {"path": str, "size": int, "sha256": NotRequired[str],
                                      "git-sha1": NotRequired[str]})


class PullRecord(TypedDict):
    """What ``models.MARKER`` holds: written last, once every file is verified."""
    repo: str
    revision: str
    commit: str
    endpoint: str
    files: list[FileRecord]
    pulled_at: str


class _Hash(Protocol):
    """A hashlib object."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class PullError(Exception):
    """One line for the operator, and the exit code."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.code = code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="Hugging Face id, e.g. Qwen/Qwen3-4B-Instruct-2507 (default: the config's model.path)")
    p.add_argument("--config", "-c", default=os.environ.get("QWENBOX_CONFIG", DEFAULT_CONFIG_PATH), metavar="PATH",
                   help=f"TOML config file: model.path and model.models_dir (default: {DEFAULT_CONFIG_PATH})")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")


def main(args: argparse.Namespace) -> int:
    cfg = load(args.config)                  # a ConfigError is cli.main's: exit 78
    name = args.model or cfg.model.path
    if not models.is_hub_id(name):
        what = "the config's model.path" if not args.model else "MODEL"
        print(f"qwenbox pull: {what} {name!r} is not a Hugging Face id like \"org/name\" "
              "(a local directory is used as it is; nothing to pull)", file=sys.stderr)
        return ExitCode.USAGE
    try:
        record = pull(name, cfg.model.models_dir, revision=args.revision)
    except PullError as e:
        print(f"qwenbox pull: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("qwenbox pull: interrupted; run it again to resume", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except OSError as e:                       # the models directory itself: permissions, space
        print(f"qwenbox pull: {e}", file=sys.stderr)
        return ExitCode.DOWNLOAD_FAILED
    size = _size(sum(f["size"] for f in record["files"]))
    print(f"qwenbox pull: {name} at commit {record['commit'][:12]} is in "
          f"{models.pulled_dir(cfg.model.models_dir, name)} ({len(record['files'])} files, {size}, verified)")
    return ExitCode.OK


def pull(repo_id: str, models_dir: str, *, revision: str | None = None) -> PullRecord:
    """Download, verify, mark complete; returns the marker's record. Raises ``PullError``."""
    if not sys.stderr.isatty():   # bars are for people; in a log they are noise
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import huggingface_hub

    token = huggingface_hub.get_token()      # HF_TOKEN, else the saved login; None = anonymous
    dest = models.pulled_dir(models_dir, repo_id)
    api = huggingface_hub.HfApi(token=token or False)
    with _hub_errors(repo_id, revision):
        commit = api.model_info(repo_id, revision=revision).sha
        if not commit:
            raise PullError(f"the hub gave no commit for {repo_id!r}", ExitCode.DOWNLOAD_FAILED)
        tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=commit)
                if isinstance(f, huggingface_hub.hf_api.RepoFile)}
    files = select(tree)
    if not any(fnmatch(f, "*.safetensors") or fnmatch(f, "*.bin") for f in files):
        raise PullError(f"{repo_id!r} has no *.safetensors or *.bin weights at its top level", ExitCode.NO_MODEL)

    owner = _service_owner(models_dir)
    try:
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PullError(f"cannot create {dest}: {e.strerror} (run it as root or as the owner of {models_dir})",
                            ExitCode.DOWNLOAD_FAILED) from None
        with _only_pull(dest):
            (dest / models.MARKER).unlink(missing_ok=True)   # from here on the directory is in flux
            _remove_stale(dest, files)
            (dest / PARTS).mkdir(parents=True, exist_ok=True)
            with _hub_errors(repo_id, revision):
                for f in files:
                    fetch(repo_id, commit, tree[f], dest, token or False)
            checked = verify(dest, [tree[f] for f in files])
            shutil.rmtree(dest / PARTS, ignore_errors=True)  # parts of other revisions' files
            record: PullRecord = {"repo": repo_id, "revision": revision or "main", "commit": commit,
                                  "endpoint": api.endpoint, "files": checked,
                                  "pulled_at": datetime.datetime.now(datetime.UTC).isoformat()}
            write_marker(dest, record)
        return record
    finally:
        if owner is not None:     # also after a failure: the partial files are what a next pull resumes
            _give_to(owner, Path(models_dir), dest)


def select(tree: dict[str, RepoFile]) -> list[str]:
    """The files of ``tree`` (path -> RepoFile) vLLM needs, sorted."""
    top = [p for p in tree if "/" not in p]
    chosen = [p for p in top if any(fnmatch(p, pat) for pat in WANTED)]
    if not any(fnmatch(p, "*.safetensors") for p in chosen):
        chosen += [p for p in top if any(fnmatch(p, pat) for pat in WEIGHTS_FALLBACK)]
    return sorted(chosen)


def fetch(repo_id: str, commit: str, entry: RepoFile, dest: Path, token: str | bool) -> None:
    """One file into ``dest``, through a part file that a later run continues with a Range
    request. A file already there at its size is left for ``verify`` to judge."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    target = dest / entry.path
    size = entry.lfs.size if entry.lfs else entry.size
    if target.is_file() and target.stat().st_size == size:
        return
    # Named by the content it will hold: a part of another revision's file is never continued.
    part = dest / PARTS / f"{entry.path}.{entry.lfs.sha256 if entry.lfs else entry.blob_id}.part"
    url = hf_hub_url(repo_id, entry.path, revision=commit)
    meta = get_hf_file_metadata(url, token=token)
    headers = build_hf_headers(token=token)
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)   # a CDN's signed URL: the token is the hub's alone
    with open(part, "r+b" if part.exists() else "w+b") as f:
        done = f.seek(0, os.SEEK_END)
        if done > size:                      # not ours to continue
            f.truncate(0)
            done = f.seek(0)
        http_get(meta.location, f, resume_size=done, headers=headers, expected_size=size,
                 displayed_filename=entry.path)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(part, 0o644)
    os.replace(part, target)


def verify(dest: Path, entries: list[RepoFile]) -> list[FileRecord]:
    """Each file's size and hash against the hub's listing; a bad file is deleted (so the next
    pull fetches it again) and ``PullError`` raised."""
    total = sum((e.lfs.size if e.lfs else e.size) for e in entries)
    print(f"qwenbox pull: verifying {len(entries)} files ({_size(total)})", file=sys.stderr)
    checked: list[FileRecord] = []
    for e in entries:
        path = dest / e.path
        size = e.lfs.size if e.lfs else e.size
        try:
            got_size = path.stat().st_size
        except FileNotFoundError:
            raise PullError(f"{e.path} is missing after the download; run it again",
                            ExitCode.DOWNLOAD_FAILED) from None
        if e.lfs:
            algo, want, got = "sha256", e.lfs.sha256, (_hash_file(path, hashlib.sha256()) if got_size == size else "")
        else:
            algo, want = "git-sha1", e.blob_id
            got = _hash_file(path, hashlib.sha1(b"blob %d\0" % got_size)) if got_size == size else ""
        if got_size != size or got != want:
            _discard(dest, e.path)
            found = f"{got_size} bytes, expected {size}" if got_size != size else f"{algo} {got}, expected {want}"
            raise PullError(f"{e.path} does not match the hub's checksum ({found}); deleted it, "
                            "run qwenbox pull again", ExitCode.BAD_DOWNLOAD)
        checked.append({"path": e.path, "size": size, "sha256": want} if e.lfs
                       else {"path": e.path, "size": size, "git-sha1": want})
    return checked


def write_marker(dest: Path, record: PullRecord) -> None:
    """``models.MARKER``, atomically and durably: a crash leaves either no marker or this one."""
    write_atomic(dest / models.MARKER, json.dumps(record, indent=2) + "\n", mode=0o644)


@contextlib.contextmanager
def _only_pull(dest: Path) -> Iterator[None]:
    """Two pulls into one directory would append to the same part files: the second one waits
    for nothing and fails at once."""
    lock = dest / ".cache" / "qwenbox-pull.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another qwenbox pull is writing {dest}", ExitCode.DOWNLOAD_FAILED) from None
        yield                                 # the lock goes with the file's closing


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _hash_file(path: Path, h: _Hash) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _discard(dest: Path, rel: str) -> None:
    (dest / rel).unlink(missing_ok=True)


def _remove_stale(dest: Path, files: list[str]) -> None:
    """Model files of an older pull that this revision no longer has (vLLM would load a stale
    ``*.safetensors`` shard next to the new ones)."""
    keep = set(files)
    for p in dest.iterdir():
        if (p.is_file() and not p.name.startswith(".") and p.name not in keep
                and any(fnmatch(p.name, pat) for pat in WANTED + WEIGHTS_FALLBACK)):
            _discard(dest, p.name)


def _service_owner(models_dir: str) -> tuple[int, int] | None:
    """(uid, gid) of ``models_dir`` when we are root and it is not root's (the package makes
    it the ``qwenbox`` user's), else None: then everything is written as whoever runs us."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(models_dir)
    except FileNotFoundError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def _give_to(owner: tuple[int, int], models_dir: Path, dest: Path) -> None:
    """chown what the pull created below ``models_dir`` to ``owner``. Links are not followed,
    and a file with more than one link is left alone (it may be another file's hard link)."""
    uid, gid = owner
    tops = [dest] + [p for p in dest.parents if models_dir in p.parents]   # org/ of org/name too
    for top in tops:
        if top.exists():
            os.chown(top, uid, gid, follow_symlinks=False)
    for root, dirs, names in os.walk(dest):
        for n in dirs + names:
            p = os.path.join(root, n)
            st = os.lstat(p)
            if st.st_nlink == 1 or os.path.isdir(p):
                os.chown(p, uid, gid, follow_symlinks=False)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's and the network's exceptions -> ``PullError`` with one line."""
    from huggingface_hub import errors
    try:
        yield
    except PullError:
        raise
    except errors.GatedRepoError:
        raise PullError(f"{repo_id!r} is gated: accept its terms on the hub and set HF_TOKEN "
                        "(or run `hf auth login`)", ExitCode.NO_MODEL) from None
    except errors.RevisionNotFoundError:
        raise PullError(f"{repo_id!r} has no revision {revision!r}", ExitCode.NO_MODEL) from None
    except errors.RepositoryNotFoundError:
        raise PullError(f"no model {repo_id!r} on the hub (or it is private: set HF_TOKEN)",
                        ExitCode.NO_MODEL) from None
    except Exception as e:                 # the network, the hub's 5xx, a full disk, offline mode
        if isinstance(e, errors.OfflineModeIsEnabled) or "HF_HUB_OFFLINE" in str(e):
            raise PullError("HF_HUB_OFFLINE is set: unset it to download", ExitCode.DOWNLOAD_FAILED) from None
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise PullError(f"download of {repo_id!r} failed: {type(e).__name__}"
                        f"{': ' + first if first else ''}; run qwenbox pull again to resume",
                        ExitCode.DOWNLOAD_FAILED) from None
