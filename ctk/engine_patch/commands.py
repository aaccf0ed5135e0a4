"""CLI of the serve part: ``ctk serve`` and ``ctk tiny-model``."""

from __future__ import annotations

from pathlib import Path

import typer


def tiny_model(
    path: Path = typer.Argument(..., help="output folder (created)"),
    hidden_size: int = typer.Option(256, help="hidden size"),
    num_layers: int = typer.Option(4, help="decoder layers"),
    num_heads: int = typer.Option(4, help="attention heads"),
    num_kv_heads: int = typer.Option(2, help="key/value heads (GQA)"),
    intermediate_size: int = typer.Option(512, help="MLP width"),
    vocab_size: int = typer.Option(4096, help="vocabulary size (tokenizer is trained to exactly this size)"),
    max_position_embeddings: int = typer.Option(8192, help="maximum context length"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
    seed: int = typer.Option(0, help="weight initialisation seed"),
) -> None:
    """Build a tiny random-weight Llama + local tokenizer + tool-call chat template (no download)."""
    from ctk.engine_patch.tiny_model import build_tiny_model

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


def register(app: typer.Typer) -> None:
    app.command("tiny-model")(tiny_model)
