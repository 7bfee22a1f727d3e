"""Card-aware sizing in a real daemon on the demo model: with every sizing key "auto", the
engine is built with what `vllm serve` would pick for this backend, admission is sized from
the KV cache the engine reports and its warm-up speed, and /health, the start log and a
SIGHUP reload say (and apply) what was chosen. The pure rules are in test_sizing.py."""
from __future__ import annotations

import signal

import pytest

from conftest import wait_for
from helpers import Daemon, chat_body, jrequest
from qwenbox.eventlog import parse_line

AUTO = "auto"


@pytest.mark.engine
def test_auto_sizing_is_chosen_from_the_engine_shown_and_applied_again_on_reload(tmp_path):
    d = Daemon(tmp_path / "d", sections={
        "engine": {"max_num_seqs": AUTO, "max_num_batched_tokens": AUTO},
        "admission": {"max_in_flight": AUTO, "max_queued": AUTO, "max_queued_prompt_tokens": AUTO},
        "sizing": {"target_ttft_p95_s": 2.0, "typical_prompt_tokens": 64, "typical_output_tokens": 16}}).start()
    try:
        h = d.wait_ready()
        s = h["sizing"]
        chosen = {k: c["value"] for k, c in s["chosen"].items()}
        print(f"\nsizing on the demo model (CPU): KV {s['kv_cache_tokens']} tokens, {chosen}, "
              f"throughput {s['throughput']}")
        assert all(c["auto"] and c["why"] for c in s["chosen"].values()), s
        # step (a): vLLM's own `vllm serve` defaults for the CPU backend
        assert (chosen["engine.max_num_seqs"], chosen["engine.max_num_batched_tokens"]) == (128, 2048)
        # step (b): from what the engine reported, never past what it can run at once
        blocks_per_request = -(-(64 + 16) // 32)           # the demo's block size is 32 (CPU)
        fits = s["kv_cache_tokens"] // (blocks_per_request * 32)
        assert chosen["admission.max_in_flight"] == min(fits, chosen["engine.max_num_seqs"])
        assert s["throughput"] and s["throughput"]["tokens_per_s"] > 0       # measured in the warm-up
        assert h["admission"]["max_in_flight"] == chosen["admission.max_in_flight"]
        assert h["admission"]["max_queued"] == chosen["admission.max_queued"]
        status, _, body = jrequest(d.sock, "POST", "/v1/chat/completions", chat_body(8))
        assert status == 200 and body["usage"]["completion_tokens"] == 8

        def sizing_events() -> list[dict]:
            return [e for e in map(parse_line, d.log_text().splitlines()) if e and e.get("event") == "sizing"]
        assert len(sizing_events()) == 1, "the start log says what was chosen"

        # a reload with a tighter latency target sizes admission again from the same engine
        d.config.write_text(d.config.read_text().replace("target_ttft_p95_s = 2.0", "target_ttft_p95_s = 0.5"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(sizing_events()) == 2, 60, lambda: f"a second event=sizing:\n{d.tail()}")
        h2 = jrequest(d.sock, "GET", "/health")[2]
        assert h2["sizing"]["target_ttft_p95_s"] == 0.5
        assert h2["sizing"]["chosen"]["admission.max_queued"]["value"] <= chosen["admission.max_queued"]
        assert h2["admission"]["max_queued"] == h2["sizing"]["chosen"]["admission.max_queued"]["value"]
    finally:
        d.stop()
