"""Write GPU profiles for the lent GPU machine: the shipped production profile and the
"untuned defaults" one, both pointed at MODEL_DIR (see docs/cost.md).

    python tests/gpu/make_configs.py MODEL_DIR OUTDIR   -> OUTDIR/tuned.toml, OUTDIR/untuned.toml
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
model, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
base = (ROOT / "etc" / "qwenbox" / "qwenbox.toml").read_text()
for a, b in [('path = "Qwen/Qwen3-4B-Instruct-2507"', f'path = "{model}"'),
             ('served_name = ""', 'served_name = "qwen3-4b"'),
             ('cache_dir = ""', f'cache_dir = "{out}/vllm-cache"'),
             ('socket = "/run/qwenbox/qwenbox.sock"', f'socket = "{out}/tuned.sock"')]:
    assert a in base, a
    base = base.replace(a, b)
(out / "tuned.toml").write_text(base)
# Untuned: the model's full context, vLLM's usual 0.9 memory share, no admission limits,
# no warm-up; scheduler limits as shipped ("auto": what `vllm serve` picks for the card).
# Keys appended here override nothing else.
untuned = base.replace("max_model_len = 8192", "max_model_len = 262144")
untuned = untuned.replace("gpu_memory_utilization = 0.7", "gpu_memory_utilization = 0.9")
untuned = untuned.replace(f'socket = "{out}/tuned.sock"', f'socket = "{out}/untuned.sock"')
untuned = untuned.replace("[warmup]\n", "[warmup]\nenabled = false\n", 1).replace(
    "# Run dummy prefills before READY=1 so the first user request is as fast as the thousandth.\n"
    "enabled = true\n", "")
for a, b in [('max_in_flight = "auto"', "max_in_flight = 1000000"), ('max_queued = "auto"', "max_queued = 1000000"),
             ('max_queued_prompt_tokens = "auto"', "max_queued_prompt_tokens = 1000000000"),
             ("queue_timeout_s = 30.0", "queue_timeout_s = 86400.0"),
             ("max_tokens_cap = 4096", "max_tokens_cap = 4096")]:
    assert a in untuned, a
    untuned = untuned.replace(a, b)
(out / "untuned.toml").write_text(untuned)
print(out / "tuned.toml", out / "untuned.toml")
