"""``ctk collect bfcl``: run BFCL multi-turn tasks with native tool calls and record every step.

Tasks, function docs and the simulated APIs come from the installed ``bfcl-eval`` package (only its data
files, ``constants.executable_backend_config`` and ``eval_checker.multi_turn_eval`` are imported: they
need no third-party packages). The loop follows BFCL's multi-turn FC inference: per user turn, query the
model with the tools; execute each returned tool call on the simulated APIs and feed the results back;
the turn ends when the model answers without tool calls or after ``max_steps`` steps. Functions withheld
in ``miss_func`` entries appear at their turn with BFCL's own prompt.

Simulated calls take microseconds, so ``--tool-latency`` injects a delay per call (a distribution, or
durations sampled from a trace store / CSV); such calls are recorded with ``injected = true``.
Requests stream, so the time to first token is recorded too.
"""

from __future__ import annotations

import ast
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ctk.collect.recorder import ProgramRecorder, Stamp
from ctk.collect.runner import CollectError, CollectOptions, Program, session_fields
from ctk.store import EXCLUDED_QUALITY_FLAGS, TraceStore
from ctk.wire import session_headers

CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
MAX_STEPS_PER_TURN = 20  # bfcl_eval.constants.default_prompts.MAXIMUM_STEP_LIMIT
ADDITIONAL_FUNCTION_PROMPT = "I have updated some more functions you can choose from. What about now?"
_TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


# -- tasks -------------------------------------------------------------------------------------------


def _bfcl_data_dir() -> Path:
    try:
        return Path(str(resources.files("bfcl_eval") / "data"))
    except ModuleNotFoundError:
        raise CollectError("bfcl-eval is not installed: pip install --no-deps bfcl-eval") from None


def load_entries(categories: list[str], filter_spec: str = "", slice_spec: str = "") -> list[dict[str, Any]]:
    """Multi-turn entries of the given categories, with ``function`` docs and ``missed_function`` docs."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    from ctk.datasets.instances import InstanceError, select

    data = _bfcl_data_dir()
    entries: list[dict[str, Any]] = []
    for cat in categories:
        if cat not in CATEGORIES:
            raise CollectError(f"--category {cat!r}: choose from {', '.join(CATEGORIES)}")
        path = data / f"BFCL_v4_multi_turn_{cat}.json"
        if not path.exists():
            raise CollectError(f"{path}: not shipped by this bfcl-eval version")
        entries += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    docs_cache: dict[str, list[dict]] = {}
    for e in entries:
        e["instance_id"] = e["id"]
        funcs: list[dict] = []
        for cls in e["involved_classes"]:
            if cls not in docs_cache:
                doc_file = data / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls]
                docs_cache[cls] = [json.loads(x) for x in doc_file.read_text().splitlines() if x.strip()]
            funcs += docs_cache[cls]
        missed = {int(k): list(v) for k, v in (e.get("missed_function") or {}).items()}
        held = {n for names in missed.values() for n in names}
        e["function"] = [f for f in funcs if f["name"] not in held]
        e["missed_docs"] = {t: [f for f in funcs if f["name"] in names] for t, names in missed.items()}
    try:
        return select(entries, filter_spec, slice_spec)
    except InstanceError as exc:
        raise CollectError(str(exc)) from None


def _schema(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _schema(v) for k, v in node.items()}
        if isinstance(out.get("type"), str):
            out["type"] = _TYPE_MAP.get(out["type"], out["type"])
            if out["type"] == "array" and "items" not in out:
                out["items"] = {"type": "string"}
        return out
    if isinstance(node, list):
        return [_schema(v) for v in node]
    return node


def to_openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BFCL function docs as OpenAI ``tools`` (``dict``/``float``/``tuple`` mapped to JSON schema types)."""
    return [
        {
            "type": "function",
            "function": {
                "name": f["name"],
                "description": f.get("description", ""),
                "parameters": _schema(f.get("parameters") or {"type": "dict"}),
            },
        }
        for f in functions
    ]


def call_string(name: str, arguments: dict[str, Any]) -> str:
    """A tool call as BFCL's executor takes it: ``name(k=repr(v), ...)``."""
    if not name.isidentifier():
        raise ValueError(f"tool name {name!r} is not an identifier")
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items() if str(k).isidentifier()) + ")"


def parse_call_string(call: str, functions: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """``"cd(folder='x')"`` -> ``("cd", {"folder": "x"})``; positional arguments take the doc's names."""
    node = ast.parse(call, mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a function call: {call!r}")
    name = node.func.id
    params = next(
        (list((f.get("parameters") or {}).get("properties") or {}) for f in functions if f["name"] == name),
        [],
    )
    args = {params[i]: ast.literal_eval(a) for i, a in enumerate(node.args) if i < len(params)}
    args.update({kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg})
    return name, args


def ground_truth_script(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A scripted-server script answering each entry with BFCL's ground-truth calls, then "Done."."""
    path = _bfcl_data_dir() / "possible_answer"
    answers: dict[str, list[list[str]]] = {}
    for f in path.glob("BFCL_v4_multi_turn_*.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                answers[row["id"]] = row["ground_truth"]
    programs = {}
    for e in entries:
        funcs = e["function"] + [f for docs in e["missed_docs"].values() for f in docs]
        turns = []
        for calls in answers[e["id"]]:
            if calls:
                tcs = [
                    dict(zip(("name", "arguments"), parse_call_string(c, funcs), strict=True)) for c in calls
                ]
                turns.append({"content": "", "tool_calls": tcs})
            turns.append({"content": "Done."})
        programs[e["id"]] = turns
    return {"programs": programs}


# -- injected latency -----------------------------------------------------------------------------


@dataclass
class LatencySampler:
    """Draws injected tool latencies (seconds) from a spec: ``const:S``, ``S``, ``exp:MEAN``,
    ``uniform:LO,HI``, ``lognormal:MEDIAN,SIGMA``, or a trace store (``*.duckdb``) / CSV with ``duration_s``
    (usable rows only; sampled with replacement). Draws are capped at ``max_s``."""

    spec: str
    seed: int = 0
    max_s: float = 300.0
    _rng: np.random.Generator = field(init=False, repr=False)
    _draw: Callable[[], float] = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._draw = self._parse(self.spec)

    def _parse(self, spec: str) -> Callable[[], float]:
        p = Path(spec)
        if p.suffix in (".duckdb", ".db", ".csv") or p.exists():
            values = self._load_durations(p)
            return lambda: float(self._rng.choice(values))
        kind, _, rest = spec.partition(":")
        try:
            if not rest:
                v = float(kind)
                return lambda: v
            nums = [float(x) for x in rest.split(",")]
            if kind == "const" and len(nums) == 1:
                return lambda: nums[0]
            if kind == "exp" and len(nums) == 1 and nums[0] > 0:
                return lambda: float(self._rng.exponential(nums[0]))
            if kind == "uniform" and len(nums) == 2 and 0 <= nums[0] <= nums[1]:
                return lambda: float(self._rng.uniform(nums[0], nums[1]))
            if kind == "lognormal" and len(nums) == 2 and nums[0] > 0 and nums[1] >= 0:
                return lambda: float(self._rng.lognormal(np.log(nums[0]), nums[1]))
        except ValueError:
            pass
        raise CollectError(
            f"--tool-latency {spec!r}: expected SECONDS, const:S, exp:MEAN, uniform:LO,HI, "
            "lognormal:MEDIAN,SIGMA, or a trace store / CSV file"
        )

    def _load_durations(self, p: Path) -> np.ndarray:
        if not p.exists():
            raise CollectError(f"--tool-latency {p}: no such file")
        if p.suffix == ".csv":
            import pandas as pd

            try:
                df = pd.read_csv(p)
            except Exception as exc:
                raise CollectError(f"--tool-latency {p}: unreadable CSV ({exc})") from None
            if "duration_s" not in df:
                raise CollectError(f"--tool-latency {p}: no duration_s column")
            if "quality_flag" in df:
                df = df[~df["quality_flag"].isin(EXCLUDED_QUALITY_FLAGS)]
            if "censored" in df:
                df = df[~df["censored"].astype(bool)]
            values = df["duration_s"].dropna().to_numpy(dtype=float)
        else:
            try:
                with TraceStore(p, read_only=True) as store:
                    df = store.tool_calls()
            except Exception as exc:
                raise CollectError(f"--tool-latency {p}: {exc}") from None
            df = df[~df["injected"].fillna(False).astype(bool) & ~df["censored"].fillna(False).astype(bool)]
            values = df["duration_s"].to_numpy(dtype=float)
        values = values[np.isfinite(values) & (values >= 0)]
        if not len(values):
            raise CollectError(f"--tool-latency {p}: no usable durations")
        return values

    def sample(self) -> float:
        with self._lock:
            return float(min(max(self._draw(), 0.0), self.max_s))


# -- the agent loop -------------------------------------------------------------------------------


@dataclass
class BfclOptions(CollectOptions):
    categories: list[str] = field(default_factory=lambda: ["base"])
    tool_latency: str | None = None
    latency_max_s: float = 300.0
    max_steps: int = MAX_STEPS_PER_TURN
    temperature: float = 0.0
    max_tokens: int | None = None
    stream: bool = True
    source: str = "collect-bfcl"
    request_timeout_s: float = 600.0


@dataclass
class _Reply:
    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None
    usage: dict[str, Any]
    first_token: Stamp | None


def _post_chat(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> _Reply:
    """One chat completion; streamed when ``body['stream']`` (tool-call deltas are reassembled)."""
    if not body.get("stream"):
        r = client.post(url, json=body, headers=headers)
        r.raise_for_status()
        data = r.json()
        choice = (data.get("choices") or [{}])[0]
        msg = choice.get("message") or {}
        return _Reply(
            msg.get("content") or "",
            msg.get("tool_calls") or [],
            choice.get("finish_reason"),
            data.get("usage") or {},
            None,
        )
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish, usage, first = None, {}, None
    with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code >= 400:
            r.read()
            r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and (delta.get("content") or delta.get("tool_calls")):
                    first = Stamp.now()
                if delta.get("content"):
                    content.append(delta["content"])
                for tc in delta.get("tool_calls") or []:
                    slot = calls.setdefault(
                        int(tc.get("index", len(calls))),
                        {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                    )
                    if tc.get("id"):
                        slot["id"] = tc["id"]
                    fn = tc.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    return _Reply("".join(content), [calls[i] for i in sorted(calls)], finish, usage, first)


def _execute(entry: dict[str, Any], model_tag: str, calls: list[str]) -> list[str]:
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

    results, _ = execute_multi_turn_func_call(
        calls,
        entry.get("initial_config") or {},
        entry["involved_classes"],
        model_tag,
        entry["id"],
        long_context="long_context" in entry["id"],
        is_evaL_run=False,
    )
    return results


def _forget_instances(model_tag: str) -> None:
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    prefix = model_tag.replace("-", "_").replace(".", "_").replace("/", "_").replace(":", "_")
    for key in [k for k in vars(multi_turn_utils) if k.startswith(prefix)]:
        vars(multi_turn_utils).pop(key, None)


class BfclCollector:
    """BFCL's multi-turn function-calling loop, one entry per program, on bfcl-eval's simulated APIs."""

    kind = "collect-bfcl"
    agent = "ctk-bfcl"

    def __init__(self, options: BfclOptions):
        self.options = options
        self.sampler: LatencySampler | None = None
        self.client: httpx.Client | None = None

    def task_id(self, task: dict[str, Any]) -> str:
        return task["id"]

    def prepare(self) -> None:
        opts = self.options
        if not opts.base_url:
            raise CollectError("--url is required: BFCL needs an OpenAI-compatible server with tool calling")
        if opts.max_steps < 1:
            raise CollectError("--max-steps must be at least 1")
        if opts.tool_latency:
            self.sampler = LatencySampler(opts.tool_latency, opts.seed, opts.latency_max_s)

    def run_config(self) -> dict[str, Any]:
        opts = self.options
        return {
            "categories": opts.categories,
            "tool_latency": opts.tool_latency,
            "max_steps": opts.max_steps,
            "stream": opts.stream,
        }

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """One HTTP client for every program."""
        limits = httpx.Limits(max_connections=max(self.options.workers, 1) * 2)
        with httpx.Client(timeout=self.options.request_timeout_s, limits=limits) as self.client:
            yield

    def _request_body(
        self, program_id: str, turn: int, last: bool, messages: list[dict], tools: list[dict]
    ) -> dict[str, Any]:
        opts = self.options
        body: dict[str, Any] = {
            "model": opts.model,
            "messages": messages,
            "tools": tools,
            "temperature": opts.temperature,
            "stream": opts.stream,
        }
        if opts.stream:
            body["stream_options"] = {"include_usage": True}
        if opts.max_tokens:
            body["max_tokens"] = opts.max_tokens
        if opts.send_metadata:
            body |= session_fields(program_id, turn, last)
        return body

    def _ask(self, rec: ProgramRecorder, url: str, body: dict[str, Any], headers: dict[str, str]) -> _Reply:
        """One LLM call, recorded (a failed request too, then the program fails)."""
        assert self.client is not None, "programs run inside session()"
        sent = Stamp.now()
        try:
            reply = _post_chat(self.client, url, body, headers)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            rec.llm_call(sent, Stamp.now(), finish_reason="error", quality_flag="error")
            raise CollectError(f"LLM request failed: {exc}") from None
        chars = len(reply.content) + sum(len(c["function"]["arguments"]) for c in reply.tool_calls)
        rec.llm_call(
            sent,
            Stamp.now(),
            first_token=reply.first_token,
            usage=reply.usage,
            finish_reason=reply.finish_reason,
            response_chars=chars,
        )
        return reply

    def _call_tool(self, rec: ProgramRecorder, entry: dict[str, Any], model_tag: str, call: dict) -> str:
        """Execute one returned tool call on the simulated APIs (after the injected latency); record it."""
        name = call["function"]["name"]
        start = Stamp.now()
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments are not an object")
            text = call_string(name, args)
            delay = self.sampler.sample() if self.sampler else 0.0
            if delay > 0:
                time.sleep(delay)
            result = _execute(entry, model_tag, [text])[0]
            status = "error" if result.startswith("Error during execution") else "0"
        except (ValueError, SyntaxError) as exc:
            text, result, status = call["function"]["arguments"], f"Error during execution: {exc}", "error"
        rec.tool_call(
            start,
            Stamp.now(),
            command=text,
            tool_name=name,
            exit_status=status,
            output_chars=len(result),
            injected=self.sampler is not None,
            provenance=f"injected:{self.options.tool_latency}" if self.sampler else "measured",
        )
        return result

    def run_program(self, program: Program) -> str:
        """Run one BFCL entry; returns its outcome (``completed`` or ``step_limit``)."""
        opts, entry, program_id = self.options, program.task, program.program_id
        assert opts.base_url, "prepare() refuses a collection without --url"
        rec = program.record(f"bfcl-{entry['id'].rsplit('_', 1)[0]}")
        model_tag = f"ctk_{program.run.run_id}_{abs(hash(program_id)) % 10**8}"
        functions = list(entry["function"])
        messages: list[dict[str, Any]] = []
        headers = session_headers(program_id) if opts.send_metadata else {}
        if opts.api_key:
            headers["Authorization"] = f"Bearer {opts.api_key}"
        url = opts.base_url.rstrip("/") + "/chat/completions"
        hit_limit = False
        _execute(entry, model_tag, [])  # load the scenario's initial state
        try:
            for t, turn_msgs in enumerate(entry["question"]):
                if t in entry["missed_docs"]:
                    functions += entry["missed_docs"][t]
                    turn_msgs = turn_msgs or [{"role": "user", "content": ADDITIONAL_FUNCTION_PROMPT}]
                messages += turn_msgs
                tools = to_openai_tools(functions)
                for step in range(opts.max_steps):
                    program.check_stop()
                    turn = rec.next_turn()
                    last = step + 1 == opts.max_steps and t + 1 == len(entry["question"])
                    body = self._request_body(program_id, turn, last, messages, tools)
                    reply = self._ask(rec, url, body, headers)
                    assistant: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
                    if reply.tool_calls:
                        for i, c in enumerate(reply.tool_calls):
                            c["id"] = c.get("id") or f"call_{turn}_{i}"
                        assistant["tool_calls"] = reply.tool_calls
                    messages.append(assistant)
                    if not reply.tool_calls:
                        break
                    for c in reply.tool_calls:
                        result = self._call_tool(rec, entry, model_tag, c)
                        messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
                else:
                    hit_limit = True
            return program.finish("step_limit" if hit_limit else "completed")
        finally:
            _forget_instances(model_tag)
