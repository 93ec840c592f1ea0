"""Step times of SmolLM2-135M-Instruct on this machine: what sized profiles/real.yaml (docs/real-model.md).

    .venv/bin/python benchmarks/real_model_steps.py      # prints one line per measurement; ~6 min on 2 cores

Full fine-tuning and LoRA (r 16 on every projection) forward + backward + AdamW on 8 random sequences of 256 and 512
tokens (two steps each: the second is the steadier), and sampling 48 new tokens from 200-token prompts at batch 16
and 32 (KV cache). fp32, 2 threads. The figures in benchmarks/real_model_steps_results.json are its output on the
machine named there.
"""

import time

import torch
from peft import LoraConfig, get_peft_model

from stages.lib import pretrained
from stages.lib.modeling import load_causal_lm

torch.manual_seed(0)
m, tok = load_causal_lm(pretrained.resolve("smollm2-135m-instruct"))
print("threads", torch.get_num_threads())
for L in (256, 512):
    x = torch.randint(5, 40000, (8, L))
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(2):
        t = time.time()
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        print("full", L, time.time() - t, flush=True)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pm = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
for L in (256, 512):
    x = torch.randint(5, 40000, (8, L))
    for _ in range(2):
        t = time.time()
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        print("lora", L, time.time() - t, flush=True)
m.eval()
with torch.no_grad():
    for batch in (16, 32):
        x = torch.randint(5, 40000, (batch, 200))
        t = time.time()
        m.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=48,
            min_new_tokens=48,
            do_sample=True,
            pad_token_id=0,
        )
        print(f"gen {batch}x48 from 200", time.time() - t)
