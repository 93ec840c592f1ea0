"""One short device check at SmolLM2-135M's shape: SFT, reward-model and PPO steps on whatever device is here.

    benchmarks/gpu_check.sh [OUT.json]       (default benchmarks/gpu_check_results.json)

On a machine with an NVIDIA GPU it trains in bf16 (params.yaml `device: auto`, `precision: auto`, resolved by the
stages' own `use_hardware`) at batch 16 x 512 tokens; without one it runs the same code on the CPU in fp32 at a batch
that finishes in a few minutes (the fallback this project's CI-class machines run). It needs only torch, transformers,
accelerate, numpy, matplotlib, scipy and pyyaml beside the project's code (what the GPU machine this project may be
lent already has): no hub, no registry, no mlflow, no trl. The model is randomly initialised at the 135M shape (the
98 MB weights need not travel: the FLOPs are the same); `--weights DIR` loads a converted folder instead.

Measured per phase: the median seconds per step (after a warm-up step), tokens/s, model FLOPs utilisation against a
matmul peak measured here first (bf16 8192^3 on a GPU, fp32 2048^3 on the CPU), and peak memory (GPU: the allocator's
maximum per phase; CPU: the process's maximum resident set). PPO is the real stage (`stages.ppo.run`, GAE with a critic,
as benchmarks/ppo_vs_trl.py runs it) on shape M (GPU) or m (CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def memory(device) -> dict[str, float]:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reset_memory(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_flops(n_matmul: int, n_layer: int, d: int, batch: int, seq: int) -> float:
    """Forward + backward FLOPs of one step: 6 N per token for the matmul weights N, plus attention's
    12 L d S per token (QK^T and AV, forward and backward; PaLM appendix B)."""
    return batch * seq * (6 * n_matmul + 12 * n_layer * d * seq)


def timed_steps(step, device, warmup: int, steps: int) -> list[float]:  # noqa: ANN001
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def train_steps(model, loss_of, device, precision: str, steps: int) -> list[float]:  # noqa: ANN001
    """Seconds of each AdamW step (forward, backward, update) after one warm-up step; memory counted from here."""
    import torch

    from stages.lib.modeling import autocast

    reset_memory(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        with autocast(precision):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, device, 1, steps)


def phase(name: str, times: list[float], tokens: int, flops: float, peak_gflops: float, device) -> dict[str, Any]:  # noqa: ANN001
    s = statistics.median(times)
    row = {
        "phase": name,
        "s_per_step": s,
        "step_times_s": times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / s,
        "tflop_per_step": flops / 1e12,
        "mfu_pct": 100 * flops / s / (peak_gflops * 1e9),
        **memory(device),
    }
    print(f"{name:4s}: {s:.3f} s/step, {tokens / s:,.0f} tokens/s, MFU {row['mfu_pct']:.1f}%", flush=True)
    return row


def models(config, weights: Path | None, device):  # noqa: ANN001
    """The causal LM and the reward model (scalar head) at the 135M shape, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if weights is not None:
        lm = AutoModelForCausalLM.from_pretrained(weights, use_safetensors=True)
        rm = AutoModelForSequenceClassification.from_pretrained(weights, num_labels=1, use_safetensors=True)
    else:
        lm = AutoModelForCausalLM.from_config(config)
        rm = AutoModelForSequenceClassification.from_config(config.__class__(**config.to_dict() | {"num_labels": 1}))
    return lm.to(device), rm.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check_results.json"))
    parser.add_argument("--weights", type=Path, help="a converted HF folder of the model (default: random init)")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    import transformers
    from ppo_vs_trl import SHAPES, build_artifacts, flops, matmul_peak, run_ours

    from stages.lib.environment import cpu_model
    from stages.lib.modeling import current_device, use_hardware

    hardware = use_hardware({"device": "auto", "precision": "auto"})
    device = current_device()
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    peak = matmul_peak()
    shape = SHAPES["M" if gpu else "m"]
    batch, seq, steps = (16, 512, 10) if gpu else (4, 128, 2)
    print(
        f"device {torch.cuda.get_device_name() if gpu else cpu_model()}; {hardware.precision}; "
        f"matmul peak {peak:,.0f} GFLOP/s",
        flush=True,
    )
    config = shape.llama_config(pad_token_id=0)
    lm, rm = models(config, args.weights, device)
    d, L, V = shape.n_embd, shape.n_layer, shape.vocab
    d_kv = d * shape.n_kv_head // shape.n_head
    n_blocks = L * (2 * d * d + 2 * d * d_kv + 3 * d * shape.intermediate)
    rows = []

    # 1. SFT: full fine-tuning, next-token loss over the whole sequence (the LM head included)
    tokens = torch.randint(0, V, (batch, seq), device=device)
    times = train_steps(lm, lambda: lm(input_ids=tokens, labels=tokens).loss, device, hardware.precision, steps)
    rows.append(phase("sft", times, batch * seq, train_flops(n_blocks + d * V, L, d, batch, seq), peak, device))
    lm.to("cpu")

    # 2. Reward model: Bradley-Terry on batch/2 pairs (chosen and rejected: `batch` sequences), no LM head
    def bt_loss():  # noqa: ANN202
        scores = rm(input_ids=tokens).logits.squeeze(-1)
        return -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()

    times = train_steps(rm, bt_loss, device, hardware.precision, steps)
    rows.append(phase("rm", times, batch * seq, train_flops(n_blocks, L, d, batch, seq), peak, device))
    rm.to("cpu")
    reset_memory(device)

    # 3. PPO: the stage itself, 1 warm-up batch + 2 measured, on the benchmark's prompts at this shape
    with tempfile.TemporaryDirectory() as work:
        build_artifacts(shape, Path(work), 2)
        out = run_ours(shape, Path(work), 2, None)
    ppo_tokens = shape.batch_size * (shape.prompt_length + shape.response_length)
    row = phase("ppo", out["per_batch"], ppo_tokens, flops(shape)["total"], peak, device)
    row |= {
        "shape": shape.name,
        "response_tokens_per_s": shape.batch_size * shape.response_length / row["s_per_step"],
        **{f"{k}_s": statistics.median(v) for k, v in out["split"].items() if k != "step"},
    }
    rows.append(row)

    result = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name() if gpu else cpu_model(),
        "precision": hardware.precision,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "matmul_peak_gflops": peak,
        "model": "SmolLM2-135M shape" + (f" ({args.weights})" if args.weights else ", random init"),
        "parameters": n_blocks + d * V,
        "sft_rm_batch": [batch, seq],
        "ppo_shape": {"batch": shape.batch_size, "prompt": shape.prompt_length, "response": shape.response_length},
        "phases": rows,
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
