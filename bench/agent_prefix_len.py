"""Where the task text starts in agents' first prompts: the tokens every program of an agent shares, which
``agent_prefix_tokens`` (the agent class from the prompt's prefix) must not pass, and where the chat
template's fixed header ends, which it must pass (README, "An agent class from the prompt's prefix").

Prompts of mini-swe-agent's configs and BFCL's, rendered with Llama 3.1's chat template (tools in the first
user message, its default) and ChatML with Qwen's tool block; tokens counted with tiktoken's cl100k (Llama 3's
tokenizer extends it), read offline from the copy litellm bundles:

    python bench/agent_prefix_len.py
"""

from __future__ import annotations

import json
import os
import pathlib
import re

LLAMA_HEADER = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
LLAMA_TOOLS = (
    "Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.Do not use variables.\n\n"
)
QWEN_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_END = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
MARK = "\x00TASK\x00"  # where the program's own text starts


def llama31(system: str | None, user: str, tools: list | None) -> str:
    s = LLAMA_HEADER + (system or "") + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    if tools:
        s += LLAMA_TOOLS + "".join(json.dumps(t, indent=4) + "\n\n" for t in tools)
    return s + user


def chatml(system: str | None, user: str, tools: list | None) -> str:
    s = "<|im_start|>system\n" + (system or "You are a helpful assistant.")
    if tools:
        s += QWEN_TOOLS + "".join("\n" + json.dumps(t) for t in tools) + QWEN_TOOLS_END
    return s + "<|im_end|>\n<|im_start|>user\n" + user


def main() -> None:
    import litellm

    tok_dir = pathlib.Path(litellm.__file__).parent / "litellm_core_utils" / "tokenizers"
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tok_dir))
    import minisweagent
    import tiktoken
    import yaml
    from bfcl_eval.constants.default_prompts import _DEFAULT_SYSTEM_PROMPT as BFCL_SYSTEM
    from minisweagent.models.utils.actions_toolcall import BASH_TOOL

    enc = tiktoken.get_encoding("cl100k_base")

    def count(text: str) -> int:  # a special token counts 1
        parts = re.split(r"(<\|[a-z_]+\|>)", text)
        return sum(1 if p.startswith("<|") else len(enc.encode(p)) for p in parts if p)

    configs = pathlib.Path(minisweagent.__file__).parent / "config"
    rows = []
    for name, tools in (
        ("benchmarks/swebench.yaml", [BASH_TOOL]),
        ("benchmarks/swebench_backticks.yaml", None),
        ("default.yaml", None),
        ("mini.yaml", None),
    ):
        agent = yaml.safe_load((configs / name).read_text())["agent"]
        user = agent["instance_template"].replace("{{task}}", MARK)
        rows.append((f"mini-swe-agent {name}", agent["system_template"], user, tools))
    # BFCL function calling as ``ctk collect bfcl`` sends it: no system prompt, the entry's tools (which
    # differ by its API classes) up to the first one's name
    rows.append(("BFCL FC (tools differ per entry)", None, MARK, [{"type": "function", "function": {}}]))
    rows.append(
        ("BFCL prompt mode (before its function docs)", BFCL_SYSTEM.replace("{functions}", MARK), "", None)
    )
    print(f"{'first prompt':48s} {'Llama 3.1':>10s} {'ChatML':>8s}  (tokens before the program's own text)")
    for label, system, user, tools in rows:
        counts = []
        for template in (llama31, chatml):
            text = template(system, user, tools)
            if label.startswith("BFCL FC"):
                text = text.replace('"function": {}', '"function": {"name": "' + MARK)
            counts.append(count(text.split(MARK)[0]))
        print(f"{label:48s} {counts[0]:10d} {counts[1]:8d}")
    print(f"{'Llama 3.1 fixed header (its date included)':48s} {count(LLAMA_HEADER):10d}")


if __name__ == "__main__":
    main()
