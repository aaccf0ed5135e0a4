"""Build a tiny random-weight Llama-family model with a locally trained tokenizer (no download).

The result is a normal Hugging Face model folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with a chat template that renders tool calls,
``generation_config.json``) that vLLM's CPU build loads offline (``HF_HUB_OFFLINE=1``). It is meant for
tests, the demo and benchmarks: its outputs are random, its speed and KV-cache footprint are real.

Python API (stable): ``build_tiny_model(path, **sizes) -> Path``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ctk.files import respect_umask

#: Special tokens, in id order (ids 0..n-1).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

#: Hermes/Qwen-style chat template: renders ``tools``, assistant ``tool_calls`` and ``tool`` messages.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\nYou may call one or more functions. Signatures:\n<tools>\n"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    'Return each call as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message.role == 'system') %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% elif message.content %}{% for part in message.content %}"
    "{% if part.text is defined %}{{ part.text }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message.tool_calls %}{% for tc in message.tool_calls %}"
    "{% set fn = tc.function if tc.function is defined else tc %}"
    '\n<tool_call>{"name": {{ fn.name | tojson }}, "arguments": '
    "{% if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}{% endif %}"
    "}</tool_call>"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Text the tokenizer always sees, so agent-style prompts tokenize sensibly.
_SEED_CORPUS = """
THOUGHT: I will look at the repository first.
```bash
cd /repo && ls -la && cat setup.py | head -50
```
```bash
python -m pytest tests/test_core.py -x -q
```
```bash
pip install -e . && grep -rn "def main" src/ | head
```
<tool_call>{"name": "ls", "arguments": {"a": true}}</tool_call>
{"tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
Observation: returncode 0, output: 3 passed in 0.42s
"""


@dataclass
class TinyModelSizes:
    """Sizes of the tiny model (defaults: 3.7 M parameters, loads and serves in seconds on CPU)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 4096
    max_position_embeddings: int = 8192
    dtype: str = "bfloat16"
    seed: int = 0

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads")
        if self.vocab_size < 512:
            raise ValueError("vocab_size must be at least 512 (256 bytes + special tokens + merges)")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, not {self.dtype!r}")


def _corpus(max_chars: int = 1_500_000) -> list[str]:
    """Training text: a fixed agent-style seed plus Python's own standard library sources (sorted)."""
    texts = [_SEED_CORPUS] * 20
    stdlib = Path(sys.modules["json"].__file__).resolve().parent.parent
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly ``vocab_size`` entries, trained locally in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    n = tok.get_vocab_size()
    if n < vocab_size:  # a small corpus can run out of merges: pad with unused tokens so ids match the model
        tok.add_tokens([f"<|unused_{i}|>" for i in range(vocab_size - n)])
    return tok


def build_tiny_model(path: str | Path, **sizes) -> Path:
    """Write a tiny random-weight Llama + tokenizer + chat template to ``path``; returns the folder.

    Keyword arguments are the fields of :class:`TinyModelSizes` (``hidden_size``, ``num_layers``,
    ``num_heads``, ``num_kv_heads``, ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``,
    ``dtype``, ``seed``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    unknown = set(sizes) - set(TinyModelSizes.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown size argument(s): {', '.join(sorted(unknown))}")
    cfg = TinyModelSizes(**sizes)
    cfg.validate()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(cfg.vocab_size)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=cfg.max_position_embeddings,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    # Some loaders read the template only from tokenizer_config.json; make sure it is there.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tc_path.write_text(json.dumps(tc, indent=2))

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        torch_dtype=cfg.dtype,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, cfg.dtype))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    for weights in out.glob("*.safetensors"):
        respect_umask(weights)  # safetensors writes 0600: other accounts could not serve the model
    (out / "ctk_tiny_model.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out


if __name__ == "__main__":  # pragma: no cover
    print(build_tiny_model(sys.argv[1]))
