"""CLI of the serve part: ``ctk serve`` and ``ctk tiny-model``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctk.policy.config import ServeConfig
from ctk.policy.rules import POLICY_NAMES, RULES

_DEFAULTS = ServeConfig()  # the CLI's defaults are the engine's (one source)


def tiny_model(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="output folder (created)")],
    hidden_size: Annotated[int, typer.Option(help="hidden size")] = 256,
    num_layers: Annotated[int, typer.Option(help="decoder layers")] = 4,
    num_heads: Annotated[int, typer.Option(help="attention heads")] = 4,
    num_kv_heads: Annotated[int, typer.Option(help="key/value heads (GQA)")] = 2,
    intermediate_size: Annotated[int, typer.Option(help="MLP width")] = 512,
    vocab_size: Annotated[
        int, typer.Option(help="vocabulary size (tokenizer is trained to exactly this size)")
    ] = 4096,
    max_position_embeddings: Annotated[int, typer.Option(help="maximum context length")] = 8192,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32")] = "bfloat16",
    seed: Annotated[int, typer.Option(help="weight initialisation seed")] = 0,
) -> None:
    """Build a tiny random-weight Llama + local tokenizer + tool-call chat template (no download)."""
    from ctk.engine_patch.serve.tiny_model import build_tiny_model

    path.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails before the notice
    typer.echo(f"building a tiny random-weight model in {path} (tokenizer, weights; ~10-20 s) ...", err=True)
    try:
        out = build_tiny_model(
            path,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            dtype=dtype,
            seed=seed,
        )
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(out))


def serve(
    ctx: typer.Context,
    ttl_model: Annotated[
        Path | None, typer.Option("--ttl-model", help="model.pkl with TTL tables (ctk train)")
    ] = None,
    policy: Annotated[str, typer.Option(help=" | ".join(POLICY_NAMES))] = _DEFAULTS.policy,
    record: Annotated[
        Path | None, typer.Option(help="record observed tool durations into this trace store")
    ] = None,
    max_pin_share: Annotated[
        float, typer.Option(help="pinned KV blocks never exceed this share of the cache")
    ] = _DEFAULTS.max_pin_share,
    age_factor: Annotated[
        float, typer.Option(help="age bound: overdue after this x FCFS's tail (q0.99) wait")
    ] = _DEFAULTS.age_factor,
    age_bound: Annotated[
        bool,
        typer.Option(
            "--age-bound",
            help="bound program order by FCFS's tail wait, so a new program's first request waits no longer "
            "than under stock vLLM (chat-like service levels); default: the policy's own (ttl, oracle, "
            "continuum: strict program order, best job completion time; progress-ttl: bounded)",
        ),
    ] = False,
    detectors: Annotated[str, typer.Option(help="tool-call detectors for output text")] = ",".join(
        _DEFAULTS.detectors
    ),
    online: Annotated[
        bool, typer.Option(help="adapt the TTL tables online from observed tool durations")
    ] = True,
    replicas: Annotated[
        int, typer.Option(min=1, help="N replicas behind vllm-router (--port is the router's)")
    ] = 1,
    routing: Annotated[
        str, typer.Option(help="with --replicas: consistent-hash | round-robin | program-scheduling")
    ] = "consistent-hash",
) -> None:
    """Serve a model with vLLM and the ctk scheduler; other arguments go to vLLM's OpenAI server.

    Example: ctk serve ./tiny --ttl-model model.pkl --policy ttl --port 8000 --kv-cache-memory-bytes 1G

    With --replicas N: N replicas on free loopback ports (each gets every other vLLM argument, its share of
    the cores, and its own --record store NAME.rK.duckdb) behind vllm-router on --host/--port.
    """
    import os
    import sys

    from ctk.engine_patch.device import pick_device
    from ctk.engine_patch.serve.server import check_model_file, check_model_path, server_env
    from ctk.policy.config import ConfigError
    from ctk.predict.modelfile import ModelFileError

    args = list(ctx.args)
    if args and not args[0].startswith("-"):
        args = ["--model", args[0], *args[1:]]
    rule = RULES.get(policy)
    if ttl_model is None and rule is not None and rule.needs_model_file:
        from ctk.predict.modelfile import default_model_path

        ttl_model = default_model_path()
        typer.echo(f"ctk serve: no --ttl-model, starting from the shipped default {ttl_model}", err=True)
    try:
        cfg = ServeConfig.from_mapping(
            {
                "policy": policy,
                "ttl_model": str(ttl_model) if ttl_model else None,
                "record": str(record) if record else None,
                "max_pin_share": max_pin_share,
                "age_factor": age_factor,
                "age_bound": True if age_bound else None,
                "detectors": detectors,
                "online": online,
            }
        )
        check_model_file(cfg)
    except (ConfigError, ModelFileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not any(a == "--model" or a.startswith("--model=") for a in args):
        typer.echo("error: give the model to serve (ctk serve MODEL ... or --model MODEL)", err=True)
        raise typer.Exit(2)
    model, other_args = _split_model(args)
    from ctk.engine_patch.serve.server import vllm_args

    try:
        device = pick_device()
        env = server_env(cfg, device=device)
        check_model_path(model, env)
        vargs = vllm_args(None, None, cfg, args, device)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(device.line(), err=True)
    if replicas > 1:
        raise typer.Exit(_serve_fleet(model, replicas, routing, cfg, other_args))
    argv = [sys.executable, "-m", "ctk.engine_patch.serve.server", *vargs]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _split_model(args: list[str]) -> tuple[str, list[str]]:
    """(the model of ``--model M`` / ``--model=M``, the other arguments)."""
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2 :]
        if a.startswith("--model="):
            return a.split("=", 1)[1], args[:i] + args[i + 1 :]
    raise ValueError("no --model")


def _serve_fleet(model: str, replicas: int, routing: str, cfg, vllm_args: list[str]) -> int:
    """``ctk serve --replicas N``: run the fleet in the foreground until Ctrl-C; returns the exit code."""
    from ctk.engine_patch.serve.fleet import Fleet, router_executable, routing_by_name
    from ctk.engine_patch.serve.server import ServerError
    from ctk.policy.config import ConfigError

    try:
        router_executable()
        fleet = Fleet(model, replicas, cfg, vllm_args, routing_by_name(routing))
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    try:
        fleet.start()
    except KeyboardInterrupt:
        return 130
    except ServerError as exc:
        typer.echo(f"error: {str(exc).splitlines()[0]}", err=True)
        return 1
    typer.echo(f"ready: {fleet.url}/v1 ({replicas} replicas, routing {routing}); Ctrl-C stops all", err=True)
    return fleet.serve_forever()


def register(app: typer.Typer) -> None:
    app.command(
        "serve",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        options_metavar="MODEL [OPTIONS] [VLLM ARGS]...",
    )(serve)
    app.command("tiny-model")(tiny_model)
