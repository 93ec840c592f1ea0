"""PPO throughput: our `stages.ppo` beside TRL 1.9.0's `trl.experimental.ppo.PPOTrainer` on identical shapes.

    python benchmarks/ppo_vs_trl.py --trl-python benchmarks/.venv-trl/bin/python     (or: benchmarks/run.sh)

The driver (project venv) builds random-init GPT-2 models and a word-level tokenizer per shape, then alternates
worker subprocesses (ours, TRL, ours, TRL, ...): ours under the project's python, TRL under its own venv (TRL 1.9.0
needs its own transformers/accelerate resolution). Each worker measures an fp32 matmul peak first, runs 1 warm-up PPO
batch + N measured batches, and prints one JSON line. fp32, 2 torch threads, no early EOS in either implementation:
the tokenizer's EOS/pad id is 512 while the models' vocabulary is 0..511, so it can never be sampled and every
response is exactly `response_length` tokens long.

Our side runs the real stage (`stages.ppo.run`) unchanged, with a stand-in tracker that timestamps each step's
metrics; TRL's side times `on_step_end`. Per-batch time is the wall time between consecutive steps (everything the
loop does), so both sides are measured the same way; the process CPU time per batch and the load average before and
after each worker are recorded beside it (on a shared machine a 2-thread run slows down far more than its CPU time
grows: every parallel region waits for the thread that was descheduled). FLOPs are counted analytically (see `flops`).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512  # model vocabulary; the tokenizer adds EOS(=pad) at id 512, outside it
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Shape:
    """One benchmark shape (policy, reference, value and reward models all share it): GPT-2 blocks, or Llama blocks
    with grouped-query attention and a gated MLP (SmolLM2's architecture)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    batch_size: int = 32
    prompt_length: int = 32
    response_length: int = 48
    ppo_epochs: int = 4
    num_mini_batches: int = 2
    arch: str = "gpt2"  # gpt2 | llama
    n_kv_head: int = 0  # llama: key/value heads (0: n_head)
    intermediate: int = 0  # llama: the gated MLP's width
    vocab: int = VOCAB

    def llama_config(self, **tokens):
        """transformers' LlamaConfig of this shape (tied embeddings, 2048 positions); `tokens`: its special ids."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.n_embd,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.n_layer,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head or self.n_head,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            **tokens,
        )


# A: the default task's model; B: 8 x 512; S: GPT-2 small's blocks (12 x 768, ~85M non-embedding parameters)
SHAPES = {
    "A": Shape("A", 4, 256, 4),
    "B": Shape("B", 8, 512, 8),
    "S": Shape("S", 12, 768, 12),
    # M: SmolLM2-135M-Instruct's shape (30 x 576, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152), random weights
    "M": Shape("M", 30, 576, 9, 16, 64, 48, 2, 2, "llama", 3, 1536, 49152),
    # m: the same model at a batch a CPU runs in a minute (benchmarks/gpu_check.sh's fallback)
    "m": Shape("m", 30, 576, 9, 4, 16, 8, 1, 1, "llama", 3, 1536, 49152),
    # T: a smoke shape for the test suite (tests/test_benchmarks.py): the harness end to end in seconds
    "T": Shape("T", 1, 32, 2, batch_size=8, prompt_length=8, response_length=8, ppo_epochs=1),
}


# ----------------------------------------------------------------------------------------------------- shared setup


def matmul_peak(n: int = 2048, reps: int = 5, rounds: int = 5, precision: str = "auto") -> float:
    """Best GFLOP/s of an n x n matmul (2 n^3 FLOPs each), best of `rounds`, in the precision the run trains in: on
    this process's CPU threads (fp32, or bf16 where asked), or bf16 at n = 8192 on a GPU (what `auto` picks there)."""
    import torch

    gpu = torch.cuda.is_available()
    bf16 = precision == "bf16" or (gpu and precision == "auto")
    n, dtype = (8192 if gpu else n), (torch.bfloat16 if bf16 else torch.float32)
    a = torch.randn(n, n, dtype=dtype, device="cuda" if gpu else "cpu")
    b = torch.randn(n, n, dtype=dtype, device=a.device)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(rounds):
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if gpu:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def build_artifacts(shape: Shape, root: Path, n_batches: int, seed: int = 0) -> None:
    """Tokenizer, policy (= reference), reward model (= value init), prompts: the files both workers load."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    V = shape.vocab
    vocab = {f"t{i}": i for i in range(V)} | {EOS: V}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    ids = dict(bos_token_id=V, eos_token_id=V, pad_token_id=V)
    if shape.arch == "llama":
        # Llama's embedding pads at pad_token_id, which must be in the vocabulary
        config = shape.llama_config(**ids | {"pad_token_id": None})
        causal, classifier = LlamaForCausalLM, LlamaForSequenceClassification
    else:
        config = GPT2Config(
            vocab_size=V,
            n_positions=128,
            n_embd=shape.n_embd,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        causal, classifier = GPT2LMHeadModel, GPT2ForSequenceClassification
    torch.manual_seed(seed)
    policy = causal(config)
    policy.generation_config.eos_token_id = policy.generation_config.pad_token_id = V
    # The RM (and the critic initialised from it) gets an embedding row for EOS: our stage's held-out comparison after
    # the timed steps scores `prompt reply EOS`. An embedding lookup costs no FLOPs; the policy cannot sample EOS.
    rm = classifier(type(config)(**config.to_dict() | {"num_labels": 1, "vocab_size": V + 1, "pad_token_id": V}))
    policy.save_pretrained(root / "sft", safe_serialization=True)
    tokenizer.save_pretrained(root / "sft")
    rm.save_pretrained(root / "reward" / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "reward" / "model")
    (root / "reward" / "norm.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (shape.batch_size * (1 + n_batches), shape.prompt_length), generator=g).tolist()
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "prompt_ids.json").write_text(json.dumps(ids))
    lines = [json.dumps({"prompt": " ".join(f"t{i}" for i in row)}) for row in ids]
    (root / "data" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (root / "data" / "eval_prompts.jsonl").write_text(lines[0] + "\n")
    held_out = {"prompt": json.loads(lines[0])["prompt"], "response": " ".join(f"t{i}" for i in ids[0][:8])}
    (root / "data" / "sft_test.jsonl").write_text(json.dumps(held_out) + "\n")  # the monitor's held-out prompts


# ---------------------------------------------------------------------------------------------------------- workers


def loadavg() -> list[float]:
    """1, 5 and 15-minute load averages (Linux), recorded with every measurement."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def timing_tracker(profile_dir: Path | None = None) -> Any:
    """The stage's own `NullTracker` (every method of the tracking interface, doing nothing), timestamping each PPO
    step's metrics: a method the interface gains is inherited, so the benchmark cannot drift from it again."""
    from stages.lib.tracking import NullTracker

    class TimingTracker(_Timing, NullTracker):
        pass

    return TimingTracker(profile_dir)


class _Timing:
    """Timestamps each PPO step's metrics; optionally profiles one step."""

    run_id = "benchmark"

    def __init__(self, profile_dir: Path | None = None) -> None:
        self.steps: list[tuple[float, float, dict[str, float]]] = []
        self.profile_dir = profile_dir
        self.cprofile: Any = None
        self.torch_prof: Any = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "time/step" not in metrics:
            return
        self.steps.append((time.perf_counter(), time.process_time(), dict(metrics)))
        if self.profile_dir is not None:
            self._profile_hook(len(self.steps))

    def _profile_hook(self, done: int) -> None:
        """cProfile around batch 2 (after warm-up), torch.profiler (with input shapes) around batch 3."""
        import cProfile
        import pstats

        import torch

        if done == 1:
            self.cprofile = cProfile.Profile()
            self.cprofile.enable()
        elif done == 2:
            self.cprofile.disable()
            with open(self.profile_dir / "cprofile.txt", "w") as f:
                pstats.Stats(self.cprofile, stream=f).sort_stats("cumulative").print_stats(40)
            self.torch_prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
            )
            self.torch_prof.start()
        elif done == 3:
            self.torch_prof.stop()
            table = self.torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            (self.profile_dir / "torch_ops.txt").write_text(table)
            by_shape = self.torch_prof.key_averages(group_by_input_shape=True)  # GFLOP/s per matmul shape
            (self.profile_dir / "torch_ops_by_shape.txt").write_text(
                by_shape.table(sort_by="self_cpu_time_total", row_limit=40, max_shapes_column_width=80)
            )


def run_ours(
    shape: Shape, root: Path, n_batches: int, profile_dir: Path | None, precision: str = "auto"
) -> dict[str, Any]:
    """Our stage, unchanged: `stages.ppo.run` for 1 + n_batches steps; no monitor, no mid-run checkpoints; in
    params.yaml's `precision` as given (auto: fp32 on a CPU, bf16 on a GPU that has it)."""
    sys.path.insert(0, str(ROOT))
    from stages.lib.modeling import autocast, use_hardware
    from stages.lib.params import defaults
    from stages.ppo import PPOConfig, run

    hardware = use_hardware({"device": "auto", "precision": precision})  # a GPU when there is one

    config = defaults(
        PPOConfig,
        seed=0,
        num_steps=1 + n_batches,
        batch_size=shape.batch_size,
        num_mini_batches=shape.num_mini_batches,
        ppo_epochs=shape.ppo_epochs,
        response_length=shape.response_length,
        temperature=0.7,
        estimator="gae",  # equal work: PPO with a critic from the RM, as TRL's PPOTrainer
        value_init="reward",
        learning_rate=3e-5,
        kl_coef=0.05,
        lora={"enabled": False},
        checkpoint_every=10**6,
        keep_checkpoints=1,
        checkpoint_dir=str(root / "ckpt_ours"),
        resume="never",
        sample_every=10**6,
        n_monitor=0,
        threads=2,
        kl_guard={"max_kl": 1e9, "max_approxkl": 1e9, "patience": 10**6},
    )
    tracker = timing_tracker(profile_dir)
    with autocast(hardware.precision):
        run(
            config,
            root / "data",
            root / "sft",
            root / "reward" / "model",
            root / "reward" / "norm.json",
            root / "out_ours",
            tracker,
        )
    per_batch = [b - a for (a, _, _), (b, _, _) in pairwise(tracker.steps)]
    cpu = [b - a for (_, a, _), (_, b, _) in pairwise(tracker.steps)]
    measured = [m for _, _, m in tracker.steps[1:]]
    split = {k: [m[f"time/{k}"] for m in measured] for k in ("generation", "scoring", "update", "step")}
    tokens = [m["tokens/response_len_mean"] * shape.batch_size for m in measured]
    return {"per_batch": per_batch, "cpu_per_batch": cpu, "split": split, "response_tokens": tokens}


def run_trl(shape: Shape, root: Path, n_batches: int, precision: str = "auto") -> dict[str, Any]:
    """TRL 1.9.0's PPOTrainer on the same files: no stop token, no EOS penalty, no sample generations; fp32, or bf16
    autocast (TRL's `bf16=True`) where ours runs in bf16."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.stamps.append((time.perf_counter(), time.process_time()))

    tokenizer = AutoTokenizer.from_pretrained(root / "sft", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(root / "sft")
    ref = AutoModelForCausalLM.from_pretrained(root / "sft")
    value = AutoModelForSequenceClassification.from_pretrained(root / "reward" / "model", num_labels=1)
    rm = AutoModelForSequenceClassification.from_pretrained(root / "reward" / "model", num_labels=1)
    ids = json.loads((root / "prompt_ids.json").read_text())
    train = Dataset.from_dict({"input_ids": ids})
    args = PPOConfig(
        output_dir=str(root / "out_trl"),
        per_device_train_batch_size=shape.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=shape.num_mini_batches,
        num_ppo_epochs=shape.ppo_epochs,
        response_length=shape.response_length,
        temperature=0.7,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        total_episodes=shape.batch_size * (1 + n_batches),
        local_rollout_forward_batch_size=shape.batch_size,
        num_sample_generations=0,
        learning_rate=3e-5,
        kl_coef=0.05,
        vf_coef=0.1,
        cliprange=0.2,
        cliprange_value=0.2,
        gamma=1.0,
        lam=0.95,
        bf16=precision == "bf16" or (precision == "auto" and torch.cuda.is_available()),
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer = StepTimes()
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=rm,
        value_model=value,
        train_dataset=train,
        eval_dataset=train.select(range(8)),
        callbacks=[timer],
    )
    torch.set_num_threads(2)  # again: nothing in the trainer's setup may have changed it
    trainer.train()
    per_batch = [b - a for (a, _), (b, _) in pairwise(timer.stamps)]
    return {
        "per_batch": per_batch,
        "cpu_per_batch": [b - a for (_, a), (_, b) in pairwise(timer.stamps)],
        "response_tokens": [shape.batch_size * shape.response_length] * len(per_batch),
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    shape = SHAPES[args.shape]
    load_before = loadavg()
    peak = matmul_peak(precision=args.precision)
    t0 = time.perf_counter()
    if args.impl == "ours":
        profile = Path(args.profile) if args.profile else None
        out = run_ours(shape, Path(args.root), args.batches, profile, args.precision)
    else:
        out = run_trl(shape, Path(args.root), args.batches, args.precision)
    import resource

    out |= {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "peak_gflops": peak,
        "peak_gflops_after": matmul_peak(precision=args.precision),
        "wall_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if args.impl == "trl":
        import transformers
        import trl

        out |= {"trl": trl.__version__, "transformers": transformers.__version__}
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------------------ FLOPs


def flops(shape: Shape) -> dict[str, float]:
    """Analytic FLOPs of one PPO batch (PaLM appendix B convention; embedding lookups and norms are free).

    N = 12 L d^2 matmul weights of the GPT-2 blocks (Llama: L (2 d^2 + 2 d d_kv + 3 d i)); the LM head adds d V (the
    tied embedding used as a matrix).
    Forward of one sequence of S tokens: 2 (N [+ d V]) S + 4 L d S^2 (QK^T and AV over the full S x S square).
    Forward + backward = 3 x forward. Generation with a KV cache: a prefill over the prompt (LM head on its last
    token only) then one token at a time, each 2 (N + d V) + 4 L d c with c the context length so far.
    """
    L, d, V = shape.n_layer, shape.n_embd, shape.vocab
    B, P, T, S = (
        shape.batch_size,
        shape.prompt_length,
        shape.response_length,
        shape.prompt_length + shape.response_length,
    )
    N, head = 12 * L * d * d, d * V
    if shape.arch == "llama":  # q, o: d^2 each; k, v: d x d_kv each (grouped-query); gated MLP: 3 d i
        d_kv = d * (shape.n_kv_head or shape.n_head) // shape.n_head
        N = L * (2 * d * d + 2 * d * d_kv + 3 * d * shape.intermediate)

    def fwd(with_head: bool) -> float:
        return B * (2 * (N + (head if with_head else 0)) * S + 4 * L * d * S * S)

    prefill = 2 * N * P + 2 * head + 4 * L * d * P * P
    decode = sum(2 * (N + head) + 4 * L * d * c for c in range(P + 1, P + T))  # tokens 2..T each need one step
    gen = B * (prefill + decode)
    # critic, reference and reward forwards; both sides take the old log-probs from the generation's logits.
    score = fwd(False) * 2 + fwd(True)
    update = shape.ppo_epochs * 3 * (fwd(True) + fwd(False))  # every sample once per epoch, policy + critic
    return {"generation": gen, "scoring": score, "update": update, "total": gen + score + update}


# ----------------------------------------------------------------------------------------------------------- driver


def run_worker(
    python: str,
    impl: str,
    shape: str,
    root: Path,
    batches: int,
    profile: Path | None = None,
    precision: str = "auto",
    tuned_malloc: bool = False,
) -> dict:
    env = os.environ | {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("GLIBC_TUNABLES", None)
    if tuned_malloc:  # what every stage process runs with (stages/lib/allocator.py)
        from stages.lib.allocator import tuned_environment

        env = tuned_environment(env)
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "worker",
        "--impl",
        impl,
        "--shape",
        shape,
        "--root",
        str(root),
        "--batches",
        str(batches),
        "--precision",
        precision,
    ]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {impl:4s} {shape}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-4000:]}
    out = json.loads(lines[-1].removeprefix("RESULT "))
    print(
        f"  {impl:4s} {shape}: {statistics.median(out['per_batch']):.2f} s/batch, "
        f"{statistics.median(out['cpu_per_batch']):.2f} CPU s/batch (process {time.perf_counter() - t:.0f} s; "
        f"load {out['loadavg_before'][0]:.2f} -> {out['loadavg_after'][0]:.2f})",
        flush=True,
    )
    return out


def summarise(shape: Shape, impl: str, runs: list[dict]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {
            "shape": shape.name,
            "impl": impl,
            "error": runs[0].get("error"),
            "stderr_tail": runs[0].get("stderr_tail"),
        }
    per_batch = [x for r in ok for x in r["per_batch"]]
    s = statistics.median(per_batch)
    tokens = statistics.median([x for r in ok for x in r["response_tokens"]])
    peak = statistics.median([p for r in ok for p in (r["peak_gflops"], r["peak_gflops_after"])])
    f = flops(shape)
    row: dict[str, Any] = {
        "shape": shape.name,
        "impl": impl,
        "s_per_batch": s,
        "tokens_per_s": tokens / s,
        "response_tokens_per_batch": tokens,
        "gflop_per_batch": f["total"] / 1e9,
        "gflops_achieved": f["total"] / s / 1e9,
        "peak_gflops": peak,
        "pct_of_peak": 100 * f["total"] / s / 1e9 / peak,
        "n_runs": len(ok),
        "n_batches": len(per_batch),
        "per_batch_s": per_batch,
        "cpu_s_per_batch": statistics.median([x for r in ok for x in r["cpu_per_batch"]]),
        "cpu_per_batch_s": [x for r in ok for x in r["cpu_per_batch"]],
        "peaks_gflops": [(r["peak_gflops"], r["peak_gflops_after"]) for r in ok],
        "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in ok),
        "peak_gpu_mb": max((r.get("peak_gpu_mb") or 0 for r in ok), default=None) or None,
        "device": ok[0].get("device", "cpu"),
        "loadavg_before_after": [(r["loadavg_before"], r["loadavg_after"]) for r in ok],
    }
    if impl == "ours":
        for k in ("generation", "scoring", "update"):
            t = statistics.median([x for r in ok for x in r["split"][k]])
            row[f"{k}_s"] = t
            row[f"{k}_pct_of_peak"] = 100 * f[k] / t / 1e9 / peak
        row["logged_step_s"] = statistics.median([x for r in ok for x in r["split"]["step"]])
    else:
        row |= {k: ok[0][k] for k in ("trl", "transformers") if k in ok[0]}
    return row


def driver(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from stages.lib.allocator import TUNABLES

    torch.set_num_threads(2)
    ours_python = str(Path(args.ours_python).absolute()) if args.ours_python else sys.executable
    trl_python = str(Path(args.trl_python).absolute()) if args.trl_python else None
    rows, profile_files = [], {}
    work = Path(tempfile.mkdtemp(prefix="ppo_bench_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # every shape's models: 5.6 GB at shape M
    load_start = loadavg()
    print(
        f"driver matmul peak (2 threads, fp32 2048^3): {matmul_peak():.0f} GFLOP/s; load {load_start}; work dir {work}",
        flush=True,
    )
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        root = work / name
        build_artifacts(shape, root, args.batches)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for _ in range(args.repeats):  # alternate, so drifting load on a shared machine hits both sides alike
            runs["ours"].append(
                run_worker(ours_python, "ours", name, root, args.batches, precision=args.precision, tuned_malloc=True)
            )
            if trl_python:
                runs["trl"].append(
                    run_worker(
                        trl_python,
                        "trl",
                        name,
                        root,
                        args.batches,
                        precision=args.precision,
                        tuned_malloc=args.trl_malloc,
                    )
                )
        for impl in ("ours", "trl"):
            if runs[impl]:
                rows.append(summarise(shape, impl, runs[impl]))
        if args.profile and name == "A":
            pdir = Path(args.out).parent / "profile"
            pdir.mkdir(exist_ok=True)
            run_worker(ours_python, "ours", name, root, 3, profile=pdir, precision=args.precision, tuned_malloc=True)
            profile_files = {p.name: str(p) for p in pdir.iterdir()}
    ratios = {}
    for name in args.shapes.split(","):
        by = {r["impl"]: r for r in rows if r["shape"] == name and "error" not in r}
        if "ours" in by and "trl" in by:
            ratios[name] = by["ours"]["tokens_per_s"] / by["trl"]["tokens_per_s"]
    result = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.cpu_count()} cpus (shared)",
        "threads": 2,
        "precision": args.precision,
        "glibc_tunables": {"ours": TUNABLES, "trl": TUNABLES if args.trl_malloc else "glibc's defaults"},
        "dtype": "bfloat16 autocast" if args.precision == "bf16" else "float32",
        "shapes": {k: asdict(v) for k, v in SHAPES.items()},
        "rows": rows,
        "ratio_ours_over_trl_tokens_per_s": ratios,
        "profile": profile_files,
        "loadavg_start_end": [load_start, loadavg()],
    }
    if args.merge and Path(args.out).exists():  # keep rows of shapes not run this time
        old = json.loads(Path(args.out).read_text())
        done = set(args.shapes.split(","))
        result["rows"] = [r for r in old["rows"] if r["shape"] not in done] + rows
        result["ratio_ours_over_trl_tokens_per_s"] = old["ratio_ours_over_trl_tokens_per_s"] | ratios
        result["runs"] = {k: v for k, v in old.get("runs", {}).items() if k not in done}
        result["profile"] = profile_files or old.get("profile", {})
        rows, ratios = result["rows"], result["ratio_ours_over_trl_tokens_per_s"]
    result.setdefault("runs", {})
    for name in args.shapes.split(","):
        result["runs"][name] = {"batches_measured_per_run": args.batches, "repeats": args.repeats}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(rows, ratios)
    print(f"wrote {args.out}")


def print_table(rows: list[dict], ratios: dict[str, float]) -> None:
    head = (
        f"{'shape':5} {'impl':4} {'s/batch':>8} {'CPU s':>6} {'tok/s':>7} {'ours/TRL':>8} "
        f"{'gen/score/update s (ours)':>26} {'%peak':>6}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:5} {r['impl']:4} ERROR {r['error']}: {r['stderr_tail'][-300:]}")
            continue
        split = f"{r['generation_s']:.2f}/{r['scoring_s']:.2f}/{r['update_s']:.2f}" if r["impl"] == "ours" else ""
        ratio = f"{ratios[r['shape']]:.2f}x" if r["impl"] == "ours" and r["shape"] in ratios else ""
        cpu = f"{r['cpu_s_per_batch']:6.2f}" if "cpu_s_per_batch" in r else f"{'-':>6}"  # rows merged from older runs
        print(
            f"{r['shape']:5} {r['impl']:4} {r['s_per_batch']:8.2f} {cpu} {r['tokens_per_s']:7.0f} "
            f"{ratio:>8} {split:>26} {r['pct_of_peak']:5.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--impl", choices=["ours", "trl"], required=True)
    w.add_argument("--shape", choices=list(SHAPES), required=True)
    w.add_argument("--root", required=True)
    w.add_argument("--batches", type=int, default=4)
    w.add_argument("--profile", default=None)
    w.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--shapes", default="A,B")
    parser.add_argument("--batches", type=int, default=4, help="measured PPO batches per run (after 1 warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per implementation and shape")
    parser.add_argument("--ours-python", default=None, help="default: this interpreter")
    parser.add_argument("--trl-python", default=None, help="python of the TRL 1.9.0 venv; omit to run ours only")
    parser.add_argument("--profile", action="store_true", help="also profile one batch of ours on shape A")
    parser.add_argument("--merge", action="store_true", help="keep other shapes' rows already in --out")
    parser.add_argument(
        "--trl-malloc",
        action="store_true",
        help="run TRL with the glibc tunables every stage of ours runs with (default: glibc's defaults, as TRL ships)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="both sides alike: auto (fp32 on a CPU, bf16 on a GPU), fp32, or bf16 autocast (a CPU with native bf16)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.json"))
    args = parser.parse_args()
    worker(args) if args.cmd == "worker" else driver(args)


if __name__ == "__main__":
    main()
