"""``ctk tiny-model``: a tiny Llama with a locally trained tokenizer and a tool-call chat template."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ctk.cli import app


def test_tiny_model_files_and_tokenizer(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (256, 4, 4096)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == cfg.vocab_size  # every id the model can sample decodes
    text = "cd /repo && python -m pytest -x"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.convert_tokens_to_ids("<tool_call>") < 10


def test_chat_template_renders_tool_calls(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # tools listed in the system turn


def test_cli_sizes_and_bad_sizes(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "tiny-model",
            str(tmp_path / "m"),
            "--hidden-size",
            "128",
            "--num-layers",
            "2",
            "--vocab-size",
            "1024",
            "--dtype",
            "float32",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (128, 2, 1024)
    bad = runner.invoke(app, ["tiny-model", str(tmp_path / "b"), "--hidden-size", "130"])
    assert bad.exit_code == 2
    assert "not a multiple" in bad.output


def test_unknown_size_argument_is_an_error(tmp_path):
    from ctk.engine_patch.serve.tiny_model import build_tiny_model

    with pytest.raises(TypeError, match="hiddden"):
        build_tiny_model(tmp_path, hiddden=3)
