"""A reward-model training step on SmolLM2-135M-Instruct: LoRA in every block against LoRA on the top blocks only
(`lora.layers`, what profiles/real.yaml's reward model uses), and a forward pass alone for scale.

    .venv/bin/python benchmarks/reward_lora_layers.py      # ~3 min on 2 cores; writes reward_lora_layers_results.json

One step = forward + backward + AdamW on 8 pairs (16 random sequences of 256 tokens) through the scalar head, with the
project's own `peft_config` (r 16, q_proj and v_proj, as the real profile). Three steps each; the median is reported.
fp32, the machine's threads; the CPU is named in the file (stages.lib.environment.cpu_model).
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from stages.lib import pretrained
from stages.lib.environment import cpu_model
from stages.lib.modeling import LoraSettings, peft_config

OUT = Path(__file__).resolve().parent / "reward_lora_layers_results.json"
PAIRS, LENGTH, STEPS = 8, 256, 3


def model():
    m = AutoModelForSequenceClassification.from_pretrained(pretrained.resolve("smollm2-135m-instruct"), num_labels=1)
    m.config.pad_token_id = 0
    return m


def step_seconds(layers: int | None) -> list[float]:
    from peft import get_peft_model

    m = model()
    lora = LoraSettings(enabled=True, r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"], layers=layers)
    m = get_peft_model(m, peft_config(lora, "SEQ_CLS", m))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(5, 40000, (2 * PAIRS, LENGTH))
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        m(input_ids=x).logits.sum().backward()
        opt.step()
        opt.zero_grad()
        times.append(round(time.perf_counter() - t, 2))
    return times


def forward_seconds() -> list[float]:
    m = model().eval()
    x = torch.randint(5, 40000, (2 * PAIRS, LENGTH))
    times = []
    with torch.no_grad():
        for _ in range(STEPS):
            t = time.perf_counter()
            m(input_ids=x)
            times.append(round(time.perf_counter() - t, 2))
    return times


def main() -> None:
    torch.manual_seed(0)
    runs = {"forward_only": forward_seconds(), "lora_every_block": step_seconds(None), "lora_top_4": step_seconds(4)}
    result = {
        "what": f"reward-model step on SmolLM2-135M-Instruct, {PAIRS} pairs ({2 * PAIRS} x {LENGTH} tokens), fp32",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).date().isoformat(),
        "steps_s": runs,
        "median_s": {k: statistics.median(v) for k, v in runs.items()},
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_s"]))


if __name__ == "__main__":
    main()
