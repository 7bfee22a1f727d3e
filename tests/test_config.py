"""qwenbox/config.py: defaults, the shipped files, and one clear message per bad file."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import DEMO_CONFIG, ROOT
from qwenbox import config
from qwenbox.config import Config, ConfigError

SHIPPED = ROOT / "etc" / "qwenbox" / "qwenbox.toml"
EX_CONFIG = 78


def write(tmp_path: Path, text: str, name: str = "qwenbox.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    return ei.value


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


# ---------------------------------------------------------------- defaults and shipped files
def test_defaults_are_the_production_profile():
    cfg = Config()
    assert cfg.model.path == "Qwen/Qwen3-4B-Instruct-2507"
    assert cfg.model.max_model_len == 8192
    assert cfg.engine.gpu_memory_utilization == 0.7
    assert cfg.engine.max_num_seqs == 128
    assert cfg.engine.block_size == 16
    assert cfg.engine.enable_prefix_caching is True
    assert cfg.engine.enforce_eager is False
    assert cfg.server.socket == "/run/qwenbox/qwenbox.sock"
    assert cfg.socket_mode_int == 0o660
    assert cfg.server.tcp == ""


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.path = "x"  # type: ignore[misc]


def test_empty_file_gives_defaults(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    assert cfg == Config()
    assert cfg.source == str(tmp_path / "qwenbox.toml")


def test_shipped_config_validates():
    cfg = config.load(SHIPPED)
    assert cfg == Config()


def test_shipped_config_lists_every_key_with_its_default():
    """The shipped file is the documentation: every key, exactly its default, nothing else."""
    doc = tomllib.loads(SHIPPED.read_text())
    assert set(doc) == set(config.SECTIONS), (
        f"qwenbox.toml lacks sections {sorted(set(config.SECTIONS) - set(doc))}, "
        f"has unknown sections {sorted(set(doc) - set(config.SECTIONS))}")
    for section, cls in config.SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(doc[section]) == set(fields), (
            f"[{section}]: missing {sorted(set(fields) - set(doc[section]))}, "
            f"extra {sorted(set(doc[section]) - set(fields))}")
        for name, f in fields.items():
            want, got = field_default(f), doc[section][name]
            assert got == want and type(got) is type(want), (
                f"{section}.{name}: qwenbox.toml says {got!r}, the default is {want!r}")


def test_demo_config_validates_and_resolves_relative_paths(demo_model):
    cfg = config.load(DEMO_CONFIG)
    assert cfg.model.path == str((ROOT / ".demo-model").resolve())
    assert cfg.server.socket == str((ROOT / ".run" / "qwenbox.sock").resolve())
    assert cfg.model.name == "qwenbox-demo"
    assert cfg.model.max_model_len == 2048
    assert cfg.engine.block_size % 32 == 0


def test_overrides_win_over_the_file(tmp_path, demo_model):
    cfg = config.load(DEMO_CONFIG, {"server.socket": str(tmp_path / "s.sock"), "model.path": str(demo_model)})
    assert cfg.server.socket == str(tmp_path / "s.sock")
    assert cfg.model.path == str(demo_model)


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    cfg = config.load(write(tmp_path, "[server]\ndrain_timeout_s = 7\n"))
    assert cfg.server.drain_timeout_s == 7.0 and isinstance(cfg.server.drain_timeout_s, float)


# ---------------------------------------------------------------- bad files
def test_toml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "[model]\nmax_model_len = 2048\npath = \n")
    e = load_error(p)
    assert e.file == str(p) and e.line == 3
    assert str(e).startswith(f"{p}:3: ")
    assert "TOML syntax error" in str(e)


def test_unknown_key_names_path_line_and_suggestion(tmp_path):
    p = write(tmp_path, "[model]\nmax_model_len = 4096\n\n[engine]\nmax_num_seq = 64\n")
    e = load_error(p)
    assert e.key == "engine.max_num_seq" and e.line == 5
    assert str(e) == f"{p}:5: engine.max_num_seq: unknown key (did you mean 'max_num_seqs'?)"


def test_unknown_key_without_close_match_lists_known_keys(tmp_path):
    e = load_error(write(tmp_path, "[limits]\nzzzz = 1\n"))
    assert e.key == "limits.zzzz" and "known keys:" in str(e) and "max_tokens_cap" in str(e)


def test_unknown_section(tmp_path):
    p = write(tmp_path, "[model]\nmax_model_len = 4096\n[modle]\npath = 'x'\n")
    e = load_error(p)
    assert e.key == "modle" and e.line == 3
    assert "unknown section" in str(e) and "did you mean 'model'" in str(e)


def test_section_that_is_not_a_table(tmp_path):
    e = load_error(write(tmp_path, "engine = 3\n"))
    assert e.key == "engine" and e.line == 1 and "expected a table" in str(e)


@pytest.mark.parametrize("text, key, line, words", [
    ("[engine]\nmax_num_seqs = 'many'\n", "engine.max_num_seqs", 2, "expected an integer, got 'many'"),
    ("[engine]\nmax_num_seqs = 1.5\n", "engine.max_num_seqs", 2, "expected an integer"),
    ("[engine]\nenforce_eager = 1\n", "engine.enforce_eager", 2, "expected a boolean"),
    ("[server]\ndrain_timeout_s = 'soon'\n", "server.drain_timeout_s", 2, "expected a number"),
    ("[server]\naccess_log = 'yes'\n", "server.access_log", 2, "expected a boolean"),
    ("[model]\npath = 3\n", "model.path", 2, "expected a string"),
    ("[warmup]\n\nprompt_buckets = [16, 'a']\n", "warmup.prompt_buckets", 3, "expected a list of integers"),
    ("[limits]\nmax_n = true\n", "limits.max_n", 2, "expected an integer"),
])
def test_wrong_type(tmp_path, text, key, line, words):
    p = write(tmp_path, text)
    e = load_error(p)
    assert (e.key, e.line) == (key, line)
    assert words in str(e)
    assert str(e).startswith(f"{p}:{line}: {key}: ")


@pytest.mark.parametrize("text, key, words", [
    ("[engine]\nmax_num_seqs = 0\n", "engine.max_num_seqs", "must be >= 1, got 0"),
    ("[engine]\nmax_num_seqs = 5000\n", "engine.max_num_seqs", "must be <= 4096"),
    ("[engine]\ngpu_memory_utilization = 0.0\n", "engine.gpu_memory_utilization", "must be > 0.0"),
    ("[engine]\ngpu_memory_utilization = 1.5\n", "engine.gpu_memory_utilization", "must be <= 1.0"),
    ("[engine]\nblock_size = 24\n", "engine.block_size", "must be one of"),
    ("[model]\ndtype = 'int3'\n", "model.dtype", "must be one of"),
    ("[limits]\nmax_n = 0\n", "limits.max_n", "must be >= 1"),
    ("[logging]\nlevel = 'loud'\n", "logging.level", "must be one of"),
    ("[server]\nmax_body_bytes = 10\n", "server.max_body_bytes", "must be >= 1024"),
])
def test_out_of_range(tmp_path, text, key, words):
    p = write(tmp_path, text)
    e = load_error(p)
    assert e.key == key and e.line == 2
    assert words in str(e)


@pytest.mark.parametrize("text, key, words", [
    ("[limits]\nmax_tokens_cap = 8192\n", "limits.max_tokens_cap", "must be below model.max_model_len"),
    ("[server]\nsocket_mode = '0999'\n", "server.socket_mode", "octal"),
    ("[server]\ntcp = 'localhost'\n", "server.tcp", "HOST:PORT"),
    ("[server]\nsocket = ''\n", "server.socket", "no listener"),
    ("[engine]\nmax_num_batched_tokens = 64\n", "engine.max_num_batched_tokens", ">= engine.max_num_seqs"),
])
def test_cross_key_rules(tmp_path, text, key, words):
    e = load_error(write(tmp_path, text))
    assert e.key == key and words in str(e)


def test_missing_local_model_path(tmp_path):
    p = write(tmp_path, "[model]\npath = './no-such-model'\n")
    e = load_error(p)
    assert e.key == "model.path" and e.line == 2
    assert str(tmp_path / "no-such-model") in str(e) and "does not exist" in str(e)


def test_local_model_dir_without_config_json(tmp_path):
    (tmp_path / "empty-model").mkdir()
    e = load_error(write(tmp_path, f"[model]\npath = '{tmp_path / 'empty-model'}'\n"))
    assert e.key == "model.path" and "no config.json" in str(e)


def test_missing_config_file(tmp_path):
    e = load_error(tmp_path / "nope.toml")
    assert str(e) == f"{tmp_path / 'nope.toml'}: config file not found"


def test_invalid_utf8_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b"[model]\nserved_name = \"\xff\"\n")
    e = load_error(p)
    assert e.line == 2 and "UTF-8" in str(e)


# ---------------------------------------------------------------- the CLI: exit code 78
def qwenbox(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenbox", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_check_config_good_files_exit_0():
    r = qwenbox("check-config", "-c", str(DEMO_CONFIG))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and r.stderr == ""


def shipped_with_models_dir(tmp_path: Path) -> Path:
    text = SHIPPED.read_text().replace('models_dir = "/var/lib/qwenbox/models"', 'models_dir = "./models"')
    return write(tmp_path, text)


def test_check_config_shipped_file_needs_the_model_pulled(tmp_path):
    """A hub id is served only from a finished `qwenbox pull` (its marker; tests/test_pull.py
    pulls for real): without it check-config says to pull, and never downloads."""
    p = shipped_with_models_dir(tmp_path)
    r = qwenbox("check-config", "-c", str(p))
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    line = next(n for n, text in enumerate(p.read_text().splitlines(), 1) if text.startswith("path = "))
    assert r.stderr == (f"qwenbox: config error: {p}:{line}: model.path: model 'Qwen/Qwen3-4B-Instruct-2507' is not "
                        f"downloaded to {tmp_path / 'models'}: run 'qwenbox pull Qwen/Qwen3-4B-Instruct-2507 -c {p}'\n")
    pulled = tmp_path / "models" / "Qwen" / "Qwen3-4B-Instruct-2507"
    pulled.mkdir(parents=True)
    r = qwenbox("check-config", "-c", str(p))
    assert r.returncode == EX_CONFIG and "is not completely downloaded to" in r.stderr
    (pulled / ".qwenbox-pull.json").write_text('{"repo": "Qwen/Qwen3-4B-Instruct-2507"}')
    r = qwenbox("check-config", "-c", str(p))
    assert r.returncode == 0, r.stderr
    assert "model 'Qwen/Qwen3-4B-Instruct-2507'" in r.stdout
    cfg = config.load(p, need_model=True)
    assert cfg.model.local_dir == str(pulled) and cfg.model.name == "Qwen/Qwen3-4B-Instruct-2507"


def test_default_models_dir_hint_says_sudo(tmp_path):
    with pytest.raises(ConfigError) as ei:
        config.load(write(tmp_path, '[model]\npath = "nobody-has/this-model"\n'), need_model=True)
    assert str(ei.value).endswith("model 'nobody-has/this-model' is not downloaded to /var/lib/qwenbox/models: "
                                  f"run 'sudo qwenbox pull nobody-has/this-model -c {tmp_path / 'qwenbox.toml'}'")
    assert config.load(write(tmp_path, '[model]\npath = "nobody-has/this-model"\n')).model.local_dir == \
        "/var/lib/qwenbox/models/nobody-has/this-model"       # loading without need_model: `pull`, `ui`


def test_a_tokenizer_id_needs_its_own_pull(tmp_path, demo_model):
    p = write(tmp_path, f'[model]\npath = "{demo_model}"\ntokenizer = "org/tok"\nmodels_dir = "./m"\n')
    with pytest.raises(ConfigError) as ei:
        config.load(p, need_model=True)
    assert ei.value.key == "model.tokenizer" and ei.value.line == 3
    assert str(ei.value).endswith(f"run 'qwenbox pull org/tok -c {p}'")
    (tmp_path / "m" / "org" / "tok").mkdir(parents=True)
    (tmp_path / "m" / "org" / "tok" / ".qwenbox-pull.json").write_text("{}")
    cfg = config.load(p, need_model=True)
    assert cfg.model.local_tokenizer_dir == str(tmp_path / "m" / "org" / "tok")
    assert cfg.model.local_dir == str(demo_model)                  # a local path stays as it is


@pytest.mark.parametrize("text, key", [
    ('[model]\npath = "a b"\n', "model.path"),
    ('[model]\npath = "org/../x"\n', "model.path"),
    ('[model]\ntokenizer = "./nowhere"\n', "model.tokenizer"),
    ('[model]\nmodels_dir = "models"\n', "model.models_dir"),
])
def test_bad_model_names(tmp_path, text, key):
    e = load_error(write(tmp_path, text))
    assert e.key == key and e.line == 2, str(e)


@pytest.mark.parametrize("text, words", [
    ("[engine]\nmax_num_seq = 64\n", ":2: engine.max_num_seq: unknown key (did you mean 'max_num_seqs'?)"),
    ("[model]\npath = \n", ":2: TOML syntax error"),
    ("[model]\npath = './nowhere'\n", ":2: model.path: model directory"),
    ("[engine]\nmax_num_seqs = 'many'\n", ":2: engine.max_num_seqs: expected an integer"),
])
def test_check_config_bad_file_exits_78(tmp_path, text, words):
    p = write(tmp_path, text)
    r = qwenbox("check-config", "-c", str(p))
    assert r.returncode == EX_CONFIG, (r.returncode, r.stdout, r.stderr)
    assert f"{p}{words}" in r.stderr
    assert r.stdout == ""


def test_check_config_missing_file_exits_78(tmp_path):
    r = qwenbox("check-config", "-c", str(tmp_path / "absent.toml"))
    assert r.returncode == EX_CONFIG and "config file not found" in r.stderr


def test_check_config_bad_model_override_exits_78(tmp_path):
    r = qwenbox("check-config", "-c", str(DEMO_CONFIG), "--model", str(tmp_path / "gone"))
    assert r.returncode == EX_CONFIG and "model.path" in r.stderr


def test_serve_with_bad_config_exits_78_without_binding(tmp_path):
    p = write(tmp_path, "[server]\nmax_body_bytes = 'big'\n")
    sock = tmp_path / "never.sock"
    r = qwenbox("serve", "-c", str(p), "--socket", str(sock))
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    assert f"{p}:2: server.max_body_bytes: expected an integer" in r.stderr
    assert not sock.exists()
