"""How the bundled profiles were made. GPU: Vidur's measured operator times + a roofline for the rest.
CPU: short runs of the real engine on this machine (prefill, decode and mixed steps), one or several pooled.

    python -m ctk.simulate.derive gpu /path/to/vidur/git-dir  # rewrites ctk/simulate/profiles/h100*.json
    python -m ctk.simulate.derive cpu [work-dir]              # measures ctk serve, rewrites cpu--tiny.json
    python -m ctk.simulate.derive cpu-fit a/cpu_measure.json b/cpu_measure.json   # refits it, pooled

Vidur (github.com/microsoft/vidur, ``data/profiling/compute/<gpu>/<model>/mlp.csv``) measured the
per-layer non-attention operators (QKV / output projections, MLP, norms, rope, residual adds) of
Llama-2-7B/70B on H100 and of Meta-Llama-3-8B/70B on A100, per batch size in tokens and tensor-parallel
degree. Llama-3.1 has the same layer shapes as Llama-3. H100 × Llama-3.x is then
``H100(Llama-2) × A100(Llama-3) / A100(Llama-2)`` per token count: the H100 speed of the layer and the
Llama-3 / Llama-2 shape ratio measured on the same A100. Attention (its CSVs are not in the public snapshot),
the lm_head, tensor-parallel all-reduces and the KV capacity come from a roofline of public hardware and
model figures, each written into the profile's ``sources``. Only derived numbers are kept; no Vidur code.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

H100 = {
    "hbm_bytes_s": 3.35e12,  # NVIDIA H100 SXM5 datasheet: HBM3 3.35 TB/s
    "bf16_flops": 989e12,  # NVIDIA H100 SXM5 datasheet: BF16 dense 989 TFLOPS
    "memory_bytes": 80e9,  # 80 GB
    "allreduce_bus_bytes_s": 300e9,  # NVLink 4 all-reduce bus bandwidth (NCCL tests reach ~300-370 GB/s)
    "allreduce_latency_s": 15e-6,  # small-message NCCL all-reduce latency within one node
}
MODELS = {
    # Hugging Face config.json of meta-llama/Llama-3.1-8B / -70B
    "llama-3.1-8b": dict(layers=32, d=4096, kv_heads=8, head_dim=128, vocab=128256, params=8.03e9),
    "llama-3.1-70b": dict(layers=80, d=8192, kv_heads=8, head_dim=128, vocab=128256, params=70.6e9),
}
GPU_MEMORY_UTILIZATION = 0.9  # vLLM default --gpu-memory-utilization
ACTIVATION_RESERVE_BYTES = 4e9  # per GPU: activations, CUDA graphs, sampler buffers (assumption)
ATTN_PREFILL_EFFICIENCY = 0.45  # share of BF16 peak reached by paged FlashAttention prefill (assumption;
# FlashAttention-3 reports 0.6-0.75 on dense causal inputs)
ATTN_DECODE_EFFICIENCY = 0.6  # share of HBM bandwidth reached reading paged KV in decode (assumption)
STEP_OVERHEAD_S = 0.0025  # vLLM v1 per-step CPU work (scheduling, input prep) not hidden (assumption)
DECODE_SEQ_S = 2e-5  # per decoding sequence: sampling and output processing (assumption)
TOKENS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096)
OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)


def _layer_ms(vidur_git: Path, gpu: str, model: str, tp: int) -> dict[int, float]:
    """Median per-layer non-attention time (ms) per token count from Vidur's mlp.csv."""
    import pandas as pd

    blob = subprocess.run(
        ["git", "--git-dir", str(vidur_git), "show", f"HEAD:data/profiling/compute/{gpu}/{model}/mlp.csv"],
        check=True,
        capture_output=True,
    ).stdout
    d = pd.read_csv(io.BytesIO(blob))
    d = d[d["num_tensor_parallel_workers"] == tp]
    cols = [f"time_stats.{o}.median" for o in OPS if f"time_stats.{o}.median" in d]
    d = d.assign(ms=d[cols].fillna(0).sum(axis=1)).groupby("num_tokens")["ms"].median()
    return {int(k): float(v) for k, v in d.items()}


def gpu_profile(vidur_git: Path, model: str, tp: int, commit: str) -> dict:
    m = MODELS[model]
    l2, l3 = (
        ("Llama-2-7b-hf", "Meta-Llama-3-8B")
        if model.endswith("8b")
        else ("Llama-2-70b-hf", "Meta-Llama-3-70B")
    )
    h_l2 = _layer_ms(vidur_git, "h100", f"meta-llama/{l2}", tp)
    a_l2 = _layer_ms(vidur_git, "a100", f"meta-llama/{l2}", tp)
    a_l3 = _layer_ms(vidur_git, "a100", f"meta-llama/{l3}", tp)
    hw = H100
    lm_head_s = m["vocab"] * m["d"] * 2 / tp / hw["hbm_bytes_s"] / 0.8  # lm_head weights read once a step
    linear_s = []
    for t in TOKENS:
        layer = h_l2[t] * a_l3[t] / a_l2[t] / 1e3
        allreduce = 0.0
        if tp > 1:  # two all-reduces per layer (attention out, MLP out) of t x d bf16
            per = hw["allreduce_latency_s"] + 2 * (tp - 1) / tp * t * m["d"] * 2 / hw["allreduce_bus_bytes_s"]
            allreduce = 2 * per
        linear_s.append(round(m["layers"] * (layer + allreduce) + lm_head_s, 7))
    kv_bytes_token = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2
    weights = m["params"] * 2 / tp
    kv_bytes = tp * (hw["memory_bytes"] * GPU_MEMORY_UTILIZATION - weights - ACTIVATION_RESERVE_BYTES)
    block_size = 16
    kv_blocks = int(kv_bytes / kv_bytes_token / block_size)
    attn_flops_pair = 4 * m["layers"] * m["d"]  # QK^T and PV: 2 x 2 x d FLOPs per layer per (query, key)
    name = f"h100--{model}" if tp == 1 else f"h100x{tp}--{model}"
    return {
        "name": name,
        "hardware": "h100" if tp == 1 else f"h100x{tp}",
        "model": model,
        "kv_blocks": kv_blocks,
        "block_size": block_size,
        "max_num_batched_tokens": 8192,
        "max_num_seqs": 1024,
        "max_model_len": 131072,
        "step_overhead_s": STEP_OVERHEAD_S,
        "linear_tokens": list(TOKENS),
        "linear_s": linear_s,
        "attn_prefill_s": attn_flops_pair / (tp * hw["bf16_flops"] * ATTN_PREFILL_EFFICIENCY),
        "attn_decode_s": kv_bytes_token / (tp * hw["hbm_bytes_s"] * ATTN_DECODE_EFFICIENCY),
        "decode_seq_s": DECODE_SEQ_S,
        "rtt_s": 0.005,
        "sources": {
            "linear_s": (
                f"Vidur (github.com/microsoft/vidur @ {commit[:12]}) data/profiling/compute: per-layer "
                f"median "
                f"of {', '.join(OPS)} at TP {tp}; h100/{l2} x a100/{l3} / a100/{l2} per token count, "
                f"x {m['layers']} layers; + lm_head weight read {lm_head_s * 1e3:.2f} ms "
                f"(roofline, 80% of HBM)"
                + (
                    f"; + 2 all-reduces per layer (latency {hw['allreduce_latency_s'] * 1e6:.0f} us, bus "
                    f"{hw['allreduce_bus_bytes_s'] / 1e9:.0f} GB/s, assumption)"
                    if tp > 1
                    else ""
                )
            ),
            "kv_blocks": (
                f"roofline: {tp} x ({hw['memory_bytes'] / 1e9:.0f} GB x {GPU_MEMORY_UTILIZATION} - "
                f"{weights / 1e9:.1f} GB bf16 weights - {ACTIVATION_RESERVE_BYTES / 1e9:.0f} GB "
                f"activations) / "
                f"{kv_bytes_token} B per token (2 x {m['layers']} layers x {m['kv_heads']} KV heads x "
                f"{m['head_dim']} x 2 B) / 16 tokens per block"
            ),
            "attn_prefill_s": (
                f"roofline: 4 x {m['layers']} layers x {m['d']} FLOPs per (query, key) pair / ({tp} x 989 "
                f"TFLOPS bf16 x {ATTN_PREFILL_EFFICIENCY}) (efficiency: assumption)"
            ),
            "attn_decode_s": (
                f"roofline: {kv_bytes_token} KV bytes per context token / ({tp} x 3.35 TB/s x "
                f"{ATTN_DECODE_EFFICIENCY}) (efficiency: assumption)"
            ),
            "step_overhead_s": "assumption: vLLM v1 per-step CPU work not overlapped with the GPU",
            "decode_seq_s": "assumption: sampling and detokenisation per decoding sequence",
            "max_num_batched_tokens": "vLLM 0.32 default for H100-class GPUs (OpenAI server): 8192",
            "max_num_seqs": "vLLM 0.32 default for H100-class GPUs: 1024",
            "rtt_s": "assumption: client <-> server round trip in one data centre",
            "hardware": "NVIDIA H100 SXM5 80 GB datasheet: 3.35 TB/s HBM3, 989 TFLOPS bf16 dense",
            "model": "Hugging Face config.json of meta-llama/Llama-3.1-8B and -70B",
        },
    }


def write_gpu_profiles(vidur_git: Path) -> None:
    commit = subprocess.run(
        ["git", "--git-dir", str(vidur_git), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    for model, tp in (("llama-3.1-8b", 1), ("llama-3.1-70b", 4)):
        prof = gpu_profile(vidur_git, model, tp, commit)
        path = PROFILES / f"{prof['name']}.json"
        path.write_text(json.dumps(prof, indent=1) + "\n")
        print(path, prof["kv_blocks"], "blocks")


def measure_cpu(work_dir: Path) -> dict:
    """Start ``ctk serve`` (policy vllm) on the tiny model with the benchmark's server flags, measure prefill
    (``ctk profile``) and engine steps (:func:`ctk.simulate.steps.measure_steps`: decode batches, prefill
    alone and mixed with decodes), stop it; the raw measurement."""
    import time
    from dataclasses import asdict

    from ctk.engine_patch.serve.server import free_port, launch_server, stop_server, wait_ready
    from ctk.engine_patch.serve.tiny_model import build_tiny_model
    from ctk.measure import server_metrics
    from ctk.measure.compare import warm_up
    from ctk.measure.presets import bench_config
    from ctk.predict.profile import profile_prefill
    from ctk.simulate.steps import measure_steps

    work_dir.mkdir(parents=True, exist_ok=True)
    model = work_dir / "tiny-model"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    cfg = bench_config()
    max_len = cfg.workload.max_context_tokens
    args = cfg.server.args(max_len)
    port = free_port()
    proc = launch_server(model, port, "vllm", extra_args=tuple(args), log_path=work_dir / "server.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, cfg.server.startup_timeout_s, proc)
        warm_up(base)
        info = server_metrics.info_labels(base)
        pre = json.loads(profile_prefill(base, work_dir / "prefill_profile.json", max_len).read_text())
        steps = measure_steps(base, block_size=int(info["block_size"]))
    finally:
        stop_server(proc)
    return {
        "prefill": pre,
        "steps": [asdict(p) for p in steps],
        "info": info,
        "server_args": args,
        "measured_unix_s": time.time(),
    }


PROFILES = Path(__file__).parent / "profiles"


def pool_measurements(measures: list[dict]) -> dict:
    """Several :func:`measure_cpu` results of the same server as one: their step points pooled (two runs 20
    minutes apart on this machine fitted decode steps 4-14% apart); the
    prefill profile, server info and round trip of the first."""
    if not measures:
        raise ValueError("no measurement to pool")
    first = measures[0]
    for m in measures[1:]:
        if m["server_args"] != first["server_args"] or m["info"].get("num_gpu_blocks") != first["info"].get(
            "num_gpu_blocks"
        ):
            raise ValueError("measurements of different servers cannot be pooled")
    times = [t for m in measures for t in (m.get("measured_unix_s_all") or [m.get("measured_unix_s")]) if t]
    return {
        **first,
        "steps": [p for m in measures for p in m["steps"]],
        "measured_unix_s": times[0] if times else None,
        "measured_unix_s_all": times,
    }


def write_cpu_profile(measure: dict) -> None:
    from ctk.simulate.profiles import HardwareProfile

    prof = cpu_profile(measure)
    path = PROFILES / "cpu--tiny.json"
    path.write_text(json.dumps(prof, indent=1) + "\n")
    print(path, f"step overhead {prof['step_overhead_s'] * 1e3:.2f} ms, {prof['kv_blocks']} blocks")
    model = HardwareProfile.from_dict(prof)
    for p in measure["steps"]:
        est = model.step_s(p["prefill_tokens"], p["prefill_attn"], p["n_decode"], p["decode_ctx"])
        print(
            f"  {p['kind']:<7} prefill {p['prefill_tokens']:>5} decode {p['n_decode']} x ctx "
            f"{p['decode_ctx']:>5}: measured {p['step_s'] * 1e3:6.2f} ms, model {est * 1e3:6.2f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("gpu", "cpu", "cpu-fit") or (argv[0] != "cpu" and len(argv) < 2):
        print(__doc__)
        return 2
    if argv[0] == "gpu":
        write_gpu_profiles(Path(argv[1]))
        return 0
    if argv[0] == "cpu-fit":
        write_cpu_profile(pool_measurements([json.loads(Path(a).read_text()) for a in argv[1:]]))
        return 0
    work = Path(argv[1]) if len(argv) > 1 else Path("out/simulate-cpu-profile")
    measure = measure_cpu(work)
    (work / "cpu_measure.json").write_text(json.dumps(measure, indent=1))
    write_cpu_profile(measure)
    return 0


def cpu_profile(measure: dict, max_model_len: int = 6144) -> dict:
    """The tiny CPU model's profile from a real-server measurement (:func:`measure_cpu`, or several of the
    same server pooled by :func:`pool_measurements`): the step model fitted to the measured decode, prefill
    and mixed steps (:func:`ctk.simulate.steps.fit_steps`); the round trip from ``ctk profile``'s shortest
    prompt."""
    from ctk.simulate.profiles import HardwareProfile
    from ctk.simulate.steps import StepPoint, fit_steps

    info, pre = measure["info"], measure["prefill"]
    points = [StepPoint(**p) for p in measure["steps"]]
    fit = fit_steps(points)
    chunk = 2048  # vLLM 0.32 CPU default max_num_batched_tokens (OpenAI server, 1 worker)
    whens = measure.get("measured_unix_s_all") or [measure.get("measured_unix_s")]
    when = ", ".join(f"{t:.0f}" for t in whens if t) or "?"
    runs = "one run" if len(whens) < 2 else f"{len(whens)} runs (step points pooled)"
    prof = {
        "name": "cpu--tiny",
        "hardware": "cpu",
        "model": "tiny",
        "kv_blocks": int(info["num_gpu_blocks"]) - 1,
        "block_size": int(info["block_size"]),
        "max_num_batched_tokens": chunk,
        "max_num_seqs": 8,
        "max_model_len": max_model_len,
        "step_overhead_s": round(fit["step_overhead_s"], 7),
        "linear_tokens": [0, chunk],
        "linear_s": [0.0, round(fit["per_token_s"] * chunk, 7)],
        "attn_prefill_s": fit["attn_prefill_s"],
        "attn_decode_s": fit["attn_decode_s"],
        "decode_seq_s": fit["decode_seq_s"],
        "rtt_s": 0.0,
        "sources": {
            "measurement": (
                f"{runs} of `ctk serve` (vLLM 0.32.0 CPU, policy vllm) on the tiny model "
                f"(ctk.engine_patch.serve.tiny_model) with {' '.join(measure['server_args'])}, on this "
                f"2-core machine (noisy), unix time {when}"
            ),
            "kv_blocks": "the server's num_gpu_blocks minus vLLM's null block; block_size: the server's",
            "step_overhead_s / linear_s / attn_prefill_s / attn_decode_s / decode_seq_s": (
                "non-negative least squares (relative error) of the step model on the steps "
                "ctk.simulate.steps.measure_steps timed on that server: decode batches (streamed, "
                "client-side), prefill alone and mixed with decodes (the server's per-request metrics)"
            ),
            "rtt_s": "ctk profile's shortest prompt's latency minus its prefill step (HTTP + tokenisation)",
            "max_num_batched_tokens": "vLLM 0.32 CPU default (OpenAI server): 2048",
            "max_num_seqs": "bench/policies.py's --max-num-seqs 8",
            "raw": json.dumps(
                {
                    "prefill": {k: pre[k] for k in ("prefill_tokens", "prefill_s", "overhead_s")},
                    "steps": measure["steps"],
                }
            ),
        },
    }
    shortest = (pre.get("raw") or [{}])[0]
    if shortest.get("latency_s"):
        import statistics

        model = HardwareProfile.from_dict(prof)
        tokens = statistics.median(shortest["tokens"])
        rtt = statistics.median(shortest["latency_s"]) - model.prefill_time_s(int(tokens))
        prof["rtt_s"] = round(max(0.001, rtt), 5)
    else:
        prof["rtt_s"] = round(max(0.001, pre.get("overhead_s", 0.005)), 5)
    return prof


if __name__ == "__main__":
    raise SystemExit(main())
