"""`qwenbox pull` against a local hub (tests/hubserver.py) serving the demo model, and what
`check-config`/`serve` say about a model that is not pulled. The real CLI, as a subprocess,
with HF_ENDPOINT pointing at the local hub and HF_HOME in the test's directory."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import DEMO_MODEL, ROOT
from hubserver import HubServer

QWENBOX = str(ROOT / ".venv" / "bin" / "qwenbox")
REPO = "qwenbox-test/demo"
MARKER = ".qwenbox-pull.json"
HF_CHUNK = 10 * 1024 * 1024           # huggingface_hub writes a download in chunks of this size
EX_BAD_DOWNLOAD, EX_NO_MODEL, EX_DOWNLOAD_FAILED, EX_CONFIG = 65, 66, 75, 78


def demo_files(demo_model: Path) -> dict[str, bytes]:
    """The demo model in the hub's layout, plus what a real repo also has and vLLM does not
    need: duplicate PyTorch weights and an ONNX export in a subfolder."""
    files = {p.name: p.read_bytes() for p in demo_model.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"\0" * 4096
    files["onnx/model.onnx"] = b"\1" * 1024
    return files


def padded_safetensors(data: bytes, at_least: int) -> bytes:
    """The same tensors with the header padded by spaces (which the format allows) to
    ``at_least`` bytes: big enough that huggingface_hub has written part of it to disk when
    the connection drops (it writes in 10 MiB chunks)."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + n], data[8 + n:]
    pad = at_least - len(data)
    pad += (-(n + pad)) % 8                   # the data must stay 8-byte aligned
    return struct.pack("<Q", n + pad) + header + b" " * pad + body


@pytest.fixture
def hub(demo_model):
    with HubServer({REPO: demo_files(demo_model)}) as h:
        yield h


def write_config(tmp_path: Path, path: str = REPO, models_dir: str = "./models") -> Path:
    p = tmp_path / "qwenbox.toml"
    p.write_text(f'[model]\npath = "{path}"\nmodels_dir = "{models_dir}"\n'
                 f'[server]\nsocket = "{tmp_path / "qwenbox.sock"}"\n')
    return p


def qwenbox(*args: str, hub: HubServer | None, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(home / "hf"), HF_ENDPOINT=hub.endpoint if hub else "http://127.0.0.1:9",
               PYTHONUNBUFFERED="1")
    return subprocess.run([QWENBOX, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=home)


def one_line(stderr: str) -> str:
    """The last line of stderr, checked to be the only line qwenbox wrote (huggingface_hub may
    log a warning of its own before it, e.g. when it retries)."""
    ours = [ln for ln in stderr.splitlines() if ln.startswith("qwenbox")]
    assert "Traceback" not in stderr, stderr
    assert len(ours) == 1 or (len(ours) == 2 and "verifying" in ours[0]), stderr
    return ours[-1]


def pulled(tmp_path: Path) -> Path:
    return tmp_path / "models" / REPO


# ---------------------------------------------------------------- pull, then serve's checks
def test_pull_downloads_what_vllm_needs_verifies_it_and_check_config_passes(tmp_path, hub, demo_model):
    cfg = write_config(tmp_path)
    r = qwenbox("check-config", "-c", str(cfg), hub=hub, home=tmp_path)
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    assert r.stderr == (f"qwenbox: config error: {cfg}:2: model.path: model '{REPO}' is not downloaded to "
                        f"{tmp_path / 'models'}: run 'qwenbox pull {REPO} -c {cfg}'\n")
    assert hub.requests == []                               # check-config never asks the hub

    r = qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"qwenbox pull: {REPO} at commit {hub.commits[REPO][:12]} is in {pulled(tmp_path)}")
    d = pulled(tmp_path)
    want = sorted(p.name for p in demo_model.iterdir() if p.is_file())
    assert sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith(".")) == want
    for name in want:
        assert (d / name).read_bytes() == (demo_model / name).read_bytes()
    assert not (d / "onnx").exists() and not (d / "pytorch_model.bin").exists()
    marker = json.loads((d / MARKER).read_text())
    assert marker["repo"] == REPO and marker["commit"] == hub.commits[REPO] and marker["revision"] == "main"
    files = {f["path"]: f for f in marker["files"]}
    assert sorted(files) == want
    st = files["model.safetensors"]
    assert st["sha256"] == hashlib.sha256((demo_model / "model.safetensors").read_bytes()).hexdigest()
    assert st["size"] == (demo_model / "model.safetensors").stat().st_size
    assert "git-sha1" in files["config.json"]
    assert not [p for p in d.iterdir() if MARKER in p.name and p.name != MARKER]   # no temporary marker left behind

    r = qwenbox("check-config", "-c", str(cfg), hub=None, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"OK (model '{REPO}'" in r.stdout               # clients still send the id

    # Pulled already: a second pull fetches no file again, and checks them all again.
    before = len(hub.requests)
    r = qwenbox("pull", REPO, "-c", str(cfg), hub=hub, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [q for q in hub.requests[before:] if q[0] == "GET" and "/resolve/" in q[1]] == []
    assert (d / MARKER).is_file()


def test_serve_with_a_model_not_pulled_exits_78_at_once(tmp_path, hub):
    cfg = write_config(tmp_path)
    r = qwenbox("serve", "-c", str(cfg), hub=hub, home=tmp_path)
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    assert f"model.path: model '{REPO}' is not downloaded to {tmp_path / 'models'}: run 'qwenbox pull" in r.stderr
    assert not (tmp_path / "qwenbox.sock").exists()
    assert hub.requests == [] and not (tmp_path / "models").exists()


def test_an_unfinished_pull_is_not_a_model(tmp_path, hub):
    cfg = write_config(tmp_path)
    pulled(tmp_path).mkdir(parents=True)
    shutil.copy(DEMO_MODEL / "config.json", pulled(tmp_path))
    r = qwenbox("check-config", "-c", str(cfg), hub=hub, home=tmp_path)
    assert r.returncode == EX_CONFIG
    assert f"model '{REPO}' is not completely downloaded to {tmp_path / 'models'}: run 'qwenbox pull" in r.stderr


# ---------------------------------------------------------------- resume, verification, errors
def test_an_interrupted_pull_resumes_where_it_stopped(tmp_path, demo_model):
    files = demo_files(demo_model)
    big = files["model.safetensors"] = padded_safetensors(files["model.safetensors"], 3 * HF_CHUNK)
    cut = HF_CHUNK + HF_CHUNK // 2
    with HubServer({REPO: files}) as hub:
        hub.cut_at["model.safetensors"] = cut              # the connection drops there, then the hub is down
        cfg = write_config(tmp_path)
        r = qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path)
        assert r.returncode == EX_DOWNLOAD_FAILED, (r.stdout, r.stderr)
        line = one_line(r.stderr)
        assert line.startswith(f"qwenbox pull: download of '{REPO}' failed: ") and line.endswith(
            "run qwenbox pull again to resume"), line
        assert not (pulled(tmp_path) / MARKER).exists()
        first = hub.downloads("model.safetensors")
        assert first[0] == (None, 200)

        hub.down = False
        r = qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path)
        assert r.returncode == 0, r.stderr
        # the second run asked only for what the first one had not written to disk
        assert hub.downloads("model.safetensors")[len(first):] == [(f"bytes={HF_CHUNK}-", 206)]
        assert (pulled(tmp_path) / "model.safetensors").read_bytes() == big
        assert json.loads((pulled(tmp_path) / MARKER).read_text())["commit"] == hub.commits[REPO]


def test_a_file_that_does_not_match_the_hubs_checksum_is_refused(tmp_path, hub):
    hub.corrupt.add("model.safetensors")
    cfg = write_config(tmp_path)
    r = qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path)
    assert r.returncode == EX_BAD_DOWNLOAD, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith("qwenbox pull: model.safetensors does not match the hub's checksum (sha256 "), line
    assert line.endswith("deleted it, run qwenbox pull again")
    d = pulled(tmp_path)
    assert not (d / MARKER).exists() and not (d / "model.safetensors").exists()
    assert qwenbox("check-config", "-c", str(cfg), hub=None, home=tmp_path).returncode == EX_CONFIG

    hub.corrupt.clear()                                     # the next pull fetches that file again
    assert qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path).returncode == 0
    assert (d / MARKER).is_file()

    # A file changed on disk after a pull: the next pull finds it (huggingface_hub alone
    # would keep it) and takes the model's completeness back.
    (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes().replace(b"<|im_end|>", b"<|im_xxx|>"))
    r = qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path)
    assert r.returncode == EX_BAD_DOWNLOAD
    assert one_line(r.stderr).startswith("qwenbox pull: tokenizer.json does not match the hub's checksum (git-sha1 ")
    assert not (d / MARKER).exists()
    assert qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path).returncode == 0


@pytest.mark.parametrize("args, code, words", [
    (["nobody/nothing"], EX_NO_MODEL,
     "qwenbox pull: no model 'nobody/nothing' on the hub (or it is private: set HF_TOKEN)"),
    ([REPO, "--revision", "v9"], EX_NO_MODEL, f"qwenbox pull: '{REPO}' has no revision 'v9'"),
    (["./some/dir"], 2, "qwenbox pull: MODEL './some/dir' is not a Hugging Face id"),
])
def test_what_the_hub_does_not_have_is_one_line(tmp_path, hub, args, code, words):
    r = qwenbox("pull", *args, "-c", str(write_config(tmp_path)), hub=hub, home=tmp_path)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert one_line(r.stderr).startswith(words) and r.stdout == ""
    assert not (tmp_path / "models").exists()


def test_an_unreachable_hub_is_one_line(tmp_path):
    r = qwenbox("pull", "-c", str(write_config(tmp_path)), hub=None, home=tmp_path)
    assert r.returncode == EX_DOWNLOAD_FAILED, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith(f"qwenbox pull: download of '{REPO}' failed: ConnectError"), line


def test_one_pull_at_a_time_per_model(tmp_path, hub):
    import fcntl
    lock = pulled(tmp_path) / ".cache" / "qwenbox-pull.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)                     # as a pull that is running would
        r = qwenbox("pull", "-c", str(write_config(tmp_path)), hub=hub, home=tmp_path)
    assert r.returncode == EX_DOWNLOAD_FAILED, (r.stdout, r.stderr)
    assert one_line(r.stderr) == f"qwenbox pull: another qwenbox pull is writing {pulled(tmp_path)}"
    assert [q for q in hub.requests if "/resolve/" in q[1]] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a pull by root into a directory another user owns")
def test_a_pull_by_root_leaves_the_files_to_the_owner_of_models_dir(tmp_path, hub):
    """The package's /var/lib/qwenbox/models belongs to the qwenbox user; `sudo qwenbox pull`
    must not leave root's files there (the service reads them, a later pull rewrites them)."""
    base = Path(tempfile.mkdtemp(prefix="qwenbox-pull-", dir="/tmp"))   # pytest's tmp is root-only
    try:
        os.chmod(base, 0o755)
        models_dir = base / "models"
        models_dir.mkdir()
        os.chown(models_dir, 65534, 65534)                 # nobody
        cfg = write_config(tmp_path, models_dir=str(models_dir))
        r = qwenbox("pull", "-c", str(cfg), hub=hub, home=tmp_path)
        assert r.returncode == 0, r.stderr
        owned = {(p.relative_to(models_dir).as_posix(), p.lstat().st_uid, p.lstat().st_gid)
                 for p in models_dir.rglob("*")}
        assert {(p, u, g) for p, u, g in owned if (u, g) != (65534, 65534)} == set()
        assert (f"{REPO}/{MARKER}", 65534, 65534) in owned
        assert (f"{REPO}/model.safetensors", 65534, 65534) in owned
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- the daemon on a pulled model
@pytest.mark.engine
def test_the_daemon_serves_a_pulled_model_by_its_id_without_asking_the_hub(tmp_path, hub):
    """The engine loads models_dir's copy; clients name the id; starting asks the hub nothing."""
    from helpers import CHAT, Daemon, jrequest
    models_dir = tmp_path / "models"
    r = qwenbox("pull", REPO, "-c", str(write_config(tmp_path)), hub=hub, home=tmp_path)
    assert r.returncode == 0, r.stderr
    asked = len(hub.requests)
    d = Daemon(tmp_path / "d", sections={"model": {"path": REPO, "models_dir": str(models_dir), "served_name": ""}},
               env={"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf")}).start()
    try:
        d.wait_ready()
        status, _, body = jrequest(d.sock, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == [REPO], body
        status, _, body = jrequest(d.sock, "POST", CHAT, {"model": REPO, "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "Hello"}]})
        assert status == 200 and body["model"] == REPO, body
    finally:
        d.stop()
    assert hub.requests[asked:] == []
