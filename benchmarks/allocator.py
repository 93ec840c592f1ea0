"""What glibc's malloc costs a training step on the CPU, and what the stages' tunables give back.

One training step at SmolLM2-135M's shape (Llama blocks, random weights, 8 x 112 tokens, logits for the last 49
positions as PPO's update keeps them, forward + backward + fused AdamW, 2 threads), in fresh processes that alternate
between glibc's defaults and `stages.lib.allocator.TUNABLES`, fp32 and (on a CPU with native bf16) bf16 autocast.
Reports the median step time and the minor page faults per step of each.

    .venv/bin/python benchmarks/allocator.py            # writes benchmarks/allocator_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppo_vs_trl import SHAPES  # noqa: E402  (this folder is sys.path[0] when a script here runs)

from stages.lib.allocator import TUNABLES  # noqa: E402
from stages.lib.environment import cpu_model  # noqa: E402
from stages.lib.modeling import cpu_has_native_bf16  # noqa: E402


def worker(precision: str, steps: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    m = SHAPES["M"]  # the PPO benchmark's SmolLM2-135M shape: one home for its dimensions
    model = LlamaForCausalLM(m.llama_config()).train()
    ids = torch.randint(0, m.vocab, (8, 112))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids, logits_to_keep=49).logits
            loss = torch.log_softmax(logits.float(), -1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: first touches of every buffer, oneDNN's kernels
        step()
    times, faults = [], []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print("RESULT " + json.dumps({"step_s": times, "minor_faults": faults}), flush=True)


def measure(precision: str, tuned: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"OMP_NUM_THREADS": "2"}
    if tuned:
        env["GLIBC_TUNABLES"] = TUNABLES
    cmd = [sys.executable, __file__, "worker", "--precision", precision, "--steps", str(steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cmd", nargs="?", default="driver", choices=["driver", "worker"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per process, after 2 warm-up steps")
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting, alternating")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "allocator_results.json"))
    args = parser.parse_args()
    if args.cmd == "worker":
        return worker(args.precision, args.steps)
    precisions = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for precision in precisions:
            for tuned in (False, True):
                key = f"{precision}/{'tuned' if tuned else 'glibc_defaults'}"
                runs.setdefault(key, []).append(measure(precision, tuned, args.steps))
                print(key, [round(s, 2) for s in runs[key][-1]["step_s"]], flush=True)
    rows: dict[str, dict[str, dict]] = {}  # precision -> glibc_defaults | tuned -> figures
    for key, rs in runs.items():
        precision, setting = key.split("/")
        times = [s for r in rs for s in r["step_s"]]
        faults = [f for r in rs for f in r["minor_faults"]]
        rows.setdefault(precision, {})[setting] = {
            "median_step_s": statistics.median(times),
            "step_s": times,
            "median_minor_faults_per_step": statistics.median(faults),
        }
    speedup = {p: rows[p]["glibc_defaults"]["median_step_s"] / rows[p]["tuned"]["median_step_s"] for p in precisions}
    result = {
        "what": "one training step at SmolLM2-135M's shape (8 x 112 tokens, forward+backward+fused AdamW, 2 threads): "
        "glibc's malloc defaults against the tunables every stage process runs with (stages/lib/allocator.py)",
        "command": "benchmarks/allocator.py",
        "cpu": cpu_model(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "tunables": TUNABLES,
        "steps_per_process": args.steps,
        "processes_per_setting": args.repeats,
        "rows": rows,
        "speedup": speedup,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for precision, settings in rows.items():
        for setting, row in settings.items():
            print(
                f"{precision} {setting:15s} {row['median_step_s']:.2f} s/step, "
                f"{row['median_minor_faults_per_step']:.0f} minor faults/step"
            )
    print("speedup", {p: round(s, 2) for p, s in speedup.items()}, "->", args.out)


if __name__ == "__main__":
    main()
