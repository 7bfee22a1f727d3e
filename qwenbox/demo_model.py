"""Build a tiny random-weight Qwen3-architecture model with its own tokenizer, locally.

Contract: ``build(out_dir)`` writes a Hugging Face model directory (config.json, safetensors
weights, tokenizer.json, tokenizer_config.json with a ChatML chat template, generation
config) that vLLM loads as ``Qwen3ForCausalLM``. No network is touched. The text it
generates is noise, but every code path (tokenization, chat template, prefill, decode,
streaming, abort, prefix caching) is the real one. The directory is written to a temporary
sibling and renamed into place, so a crash never leaves a half-written model behind.

Shape choices come from checked facts about vLLM's CPU backend: head_dim 64 (16 is
rejected by the CPU attention kernels), GQA with 2 KV heads like the real model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

VOCAB_SIZE = 1024  # BPE target; the model's vocab is what training reached
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKER = "qwenbox-demo-model.json"

# The chat template is Qwen's ChatML shape (system/user/assistant turns between
# <|im_start|> and <|im_end|>), so prompts look like the real model's.
# ChatML, as Qwen3 writes it; with tools, Qwen3's own tool block (the definitions in a system
# turn, calls as <tool_call> JSON, results as <tool_response> in a user turn), so that the
# hermes parser reads the demo model's tool calls as it reads Qwen3's.
_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_EPILOGUE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n")
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '" + _TOOLS_PREAMBLE + "' }}{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '" + _TOOLS_EPILOGUE + "' }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['tool_calls'] is defined %}{% for tc in message['tool_calls'] %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + tc['function']['name'] + '\", \"arguments\": ' }}"
    "{% if tc['function']['arguments'] is string %}{{ tc['function']['arguments'] }}"
    "{% else %}{{ tc['function']['arguments'] | tojson }}{% endif %}{{ '}\n</tool_call>' }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tokenizer: enough variety for byte-level BPE merges to form.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question briefly and precisely.",
    "Summarize the following text in one sentence.",
    "What is the capital of France? Paris is the capital of France.",
    "Explain how a transformer language model generates text token by token.",
    "GPU memory, KV cache, prefix caching, batching and latency are what inference costs.",
    "Write a short poem about the sea, the wind and the morning light.",
    "def main():\n    print('hello world')\n    return 0\n",
    "1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828",
    "请用一句话总结下面的文字。这是一个测试。",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
]

DEFAULT_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     max_position_embeddings=8192)


def is_demo_model(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MARKER).is_file()


def build(out_dir: str | os.PathLike[str], *, seed: int = 0, force: bool = False) -> Path:
    """Write the demo model to ``out_dir``; a complete existing one is kept unless ``force``."""
    out = Path(out_dir).resolve()
    if out.exists() and is_demo_model(out) and not force:
        return out
    if out.exists() and any(out.iterdir()) and not is_demo_model(out):
        raise FileExistsError(f"{out} exists and is not a qwenbox demo model; refusing to overwrite it")

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIALS), special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
        tok.add_special_tokens(SPECIALS)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", bos_token=None,
                                       chat_template=CHAT_TEMPLATE)
        fast.model_max_length = DEFAULT_SHAPE["max_position_embeddings"]
        fast.save_pretrained(tmp)
        eos = fast.convert_tokens_to_ids("<|im_end|>")
        pad = fast.convert_tokens_to_ids("<|endoftext|>")

        # The model's vocabulary is exactly the tokenizer's: every id it can sample decodes.
        cfg = Qwen3Config(vocab_size=len(fast), rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                          tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                          bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
                          use_sliding_window=False, sliding_window=None, **DEFAULT_SHAPE)
        cfg.architectures = ["Qwen3ForCausalLM"]
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        model = model.to(torch.bfloat16)
        model.config.torch_dtype = torch.bfloat16
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": eos, "pad_token_id": pad, "temperature": 0.7, "top_p": 0.8}, indent=2))
        (tmp / MARKER).write_text(json.dumps(
            {"what": "random-weight Qwen3-architecture demo model built by `qwenbox demo-model`",
             "seed": seed, "vocab_size": len(fast), **DEFAULT_SHAPE}, indent=2))
        # mkdtemp makes a 0700 folder: the service user and other readers need to read it.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
