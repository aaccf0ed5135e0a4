"""Request metadata: vllm-router's ``agentic_context``, and values vLLM's own validation would refuse.

vLLM's request model (``CompletionRequest`` / ``ChatCompletionRequest`` of 0.32) is the judge here: each bad
body is shown to fail its validation as sent, and to pass after ``ctk serve``'s request filter, with the hints
ctk reads from it intact. ``test_engine_hints_served.py`` sends the same bodies to a live server.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from ctk.engine_patch.request_filter import MetadataFilter, sanitize_body
from ctk.policy.hints import parse_hints, sanitize_xargs

#: body fragment -> what vLLM 0.32 does with it as sent (measured on a live server, see the served test)
REFUSED_BY_VLLM = {
    "xargs null value": {"vllm_xargs": {"session_id": None, "program_id": "p1"}},
    "xargs nested object": {
        "vllm_xargs": {"agentic_context": {"program_id": "p1", "kv_retention_ttl_seconds": 5}}
    },
    "xargs nested list": {"vllm_xargs": {"program_id": "p1", "x": [[1, 2], {"a": None}]}},
    "xargs integer beyond 64 bits": {"vllm_xargs": {"program_id": "p1", "turn_index": 10**30}},
    "xargs not an object": {"vllm_xargs": "program_id=p1"},
    "body session_id a number": {"session_id": 12345},
}


def _vllm_request(body: dict):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_tokens": 2, **body})
    req.to_sampling_params(max_tokens=2)  # where vLLM checks the integer range of extra_args
    return req


@pytest.mark.parametrize("name", list(REFUSED_BY_VLLM))
def test_vllm_refuses_as_sent_and_accepts_after_the_filter(name):
    from vllm.exceptions import VLLMValidationError

    body = REFUSED_BY_VLLM[name]
    with pytest.raises((ValueError, VLLMValidationError)):  # pydantic's ValidationError is a ValueError
        _vllm_request(body)
    raw = json.dumps({"model": "m", "prompt": "hi", **body}).encode()
    clean, changes = sanitize_body(raw)
    assert changes, name
    req = _vllm_request({k: v for k, v in json.loads(clean).items() if k not in ("model", "prompt")})
    if "vllm_xargs" in body and isinstance(body["vllm_xargs"], dict):
        assert parse_hints(req.session_id, req.vllm_xargs).program_id == "p1"


def test_values_vllm_accepts_pass_unchanged():
    body = json.dumps(
        {
            "model": "m",
            "prompt": "hi",
            "session_id": "s",
            "vllm_xargs": {"turn_index": 1e30, "a": [1, "x"], "b": True},
        }
    ).encode()
    assert sanitize_body(body) == (body, [])
    no_meta = b'{"model": "m", "prompt": "' + b"x" * 1000 + b'"}'
    assert sanitize_body(no_meta) == (no_meta, [])
    assert sanitize_body(b"{not json")[1] == []
    assert sanitize_xargs({"a": 1})[0] == {"a": 1} and sanitize_xargs(None) == (None, [])


def test_router_agentic_context_object_or_json_text():
    ctx = {
        "program_id": "task-a:researcher",
        "step_id": 7,
        "expected_resume": False,
        "kv_retention_ttl_seconds": 5,
    }
    for value in (ctx, json.dumps(ctx)):
        h = parse_hints("session-a", {"agentic_context": value})
        assert (h.program_id, h.turn_index, h.last_turn, h.ttl_hint_s) == ("task-a:researcher", 7, True, 5.0)
    # the router's sanitized form (JSON text) reads the same
    xargs, _ = sanitize_xargs({"agentic_context": ctx})
    assert parse_hints("session-a", xargs).program_id == "task-a:researcher"
    # task + agent make the program; the session header alone stays the program when the context has no agent
    assert parse_hints(None, {"agentic_context": {"task_id": "t", "agent_id": "w"}}).program_id == "t:w"
    assert parse_hints("s", {"agentic_context": {"agent_id": "w"}}).program_id == "s:w"
    assert parse_hints("s", {"agentic_context": {"expected_resume": True}}).program_id == "s"
    # a flat key wins over the same fact in the context
    h = parse_hints("s", {"turn_index": 2, "kv_retention_ttl_seconds": 1, "agentic_context": ctx})
    assert (h.turn_index, h.ttl_hint_s) == (2, 1.0)
    # the router's agent is the admission order's agent (admit_order=agent), unless the flat key names one
    assert parse_hints(None, {"agentic_context": {"task_id": "t", "agent_id": " coder "}}).agent == "coder"
    assert parse_hints(None, {"agent": "swe", "agentic_context": {"agent_id": "coder"}}).agent == "swe"
    assert parse_hints(None, {"agentic_context": {"task_id": "t", "agent_id": 5}}).agent is None


def test_bad_agentic_context_is_ignored_with_a_warning():
    for bad in ("{not json", 5, ["a"], "x" * 20_000, {"program_id": {"nested": 1}, "step_id": -1}):
        h = parse_hints("s", {"agentic_context": bad})
        assert h.program_id == "s" and h.turn_index is None and h.warnings
    h = parse_hints(None, {"turn_index": 10**30, "agentic_context": {"kv_retention_ttl_seconds": "inf"}})
    assert h.turn_index is None and h.ttl_hint_s is None and len(h.warnings) == 2


def test_middleware_rewrites_the_body_and_its_length():
    seen = {}

    async def app(scope, receive, send):
        msg = await receive()
        seen["body"], seen["headers"] = msg["body"], dict(scope["headers"])

    body = json.dumps({"model": "m", "vllm_xargs": {"agentic_context": {"program_id": "p"}}}).encode()
    chunks = [body[:10], body[10:]]

    async def receive():
        part = chunks.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(MetadataFilter(app)(scope, receive, None))
    xargs = json.loads(seen["body"])["vllm_xargs"]
    assert json.loads(xargs["agentic_context"]) == {"program_id": "p"}
    assert int(seen["headers"][b"content-length"]) == len(seen["body"])


@pytest.mark.parametrize("key", ["tool", "agent"])
def test_text_labels_are_stripped_cut_and_checked(key):
    """``tool`` and ``agent`` share one rule: stripped text, cut to its limit; blank is no label; a value
    that is not a string is ignored with a warning (the request still runs)."""
    assert getattr(parse_hints(None, {"program_id": "p", key: "  make test \n"}), key) == "make test"
    assert getattr(parse_hints(None, {"program_id": "p", key: "   "}), key) is None
    long = parse_hints(None, {"program_id": "p", key: "x" * 5000})
    assert 0 < len(getattr(long, key)) < 5000 and not long.warnings
    bad = parse_hints(None, {"program_id": "p", key: 7})
    assert getattr(bad, key) is None and bad.program_id == "p"
    assert any(w.startswith(f"{key}: expected a string") for w in bad.warnings)
