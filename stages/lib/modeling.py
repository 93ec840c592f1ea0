"""Models and tokenizers: any HF causal LM by path or name, or a tiny one built from a config for the default task.

The tiny model gets a byte-level BPE tokenizer trained on the task's own text with `tokenizers`; both are saved in HF
format, so every later stage loads them exactly like a hub model (`from_pretrained`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from stages.lib import pretrained
from stages.lib.environment import cpu_model
from stages.lib.params import AT_LEAST_ONE, POSITIVE, Allowed, ParamsError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TINY_PREFIX = "tiny-"  # model: tiny-gpt2 | tiny-llama builds from `TinyModelConfig`


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a model built from scratch (params.yaml: sft.tiny)."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    max_positions: int
    dropout: float  # HF default; it helps the tiny model generalise to held-out prompts

    SECTION: ClassVar[str] = "sft.tiny"
    RANGES: ClassVar[dict] = {
        "n_layer": AT_LEAST_ONE,
        "n_embd": AT_LEAST_ONE,
        "n_head": AT_LEAST_ONE,
        "vocab_size": AT_LEAST_ONE,
        "max_positions": AT_LEAST_ONE,
        "dropout": Allowed(0, 1, high_open=True),
    }


@dataclass(frozen=True)
class LoraSettings:
    """LoRA (peft) switches (params.yaml: <stage>.lora)."""

    enabled: bool
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]
    layers: int | None  # adapters on the top N transformer blocks only (null: all): backward stops below them

    SECTION: ClassVar[str] = "sft.lora"  # the same keys in reward.lora and ppo.lora
    RANGES: ClassVar[dict] = {
        "r": AT_LEAST_ONE,
        "alpha": POSITIVE,
        "dropout": Allowed(0, 1, high_open=True),
        "layers": AT_LEAST_ONE,
    }


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class PrecisionError(ParamsError):
    """The precision asked for cannot run well (or at all) on this device."""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX-BF16). Without either, bf16 autocast on the
    CPU is emulated: measured 12x slower than fp32 on an AMD EPYC (shared/ENVIRONMENT.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(setting: str, device: str = "cpu", native_bf16: bool | None = None) -> str:
    """The precision a stage trains and evaluates in: params.yaml `precision` resolved for `device`.

    auto: fp32 on every CPU (results do not depend on which CPU ran them), bf16 on a GPU that supports it, else fp32.
    bf16 on a CPU only where it is native (else it is refused: it would run ~12x slower); fp16 only on a GPU.
    """
    if setting not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, not {setting!r}")
    if device == "cpu":
        if setting in ("auto", "fp32"):
            return "fp32"
        if setting == "fp16":
            raise PrecisionError("precision fp16 needs a GPU; on a CPU use fp32 (or auto)")
        if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
            raise PrecisionError(
                f"precision bf16 asked for, but this CPU ({cpu_model()}) has no native bf16 "
                "(avx512_bf16/amx_bf16): bf16 would run ~12x slower than fp32; use fp32 or auto"
            )
        return "bf16"
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return setting


DEVICES = ("auto", "cpu", "cuda")
_device = "cpu"  # where this stage's models go: set once per stage process by `use_hardware`


@dataclass(frozen=True)
class Hardware:
    """Where a stage runs and in what precision: params.yaml `device` and `precision`, resolved once."""

    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16


def resolve_device(setting: str) -> str:
    """params.yaml `device`: auto (CUDA when torch sees a GPU, else the CPU) | cpu | cuda (refused without a GPU)."""
    if setting not in DEVICES:
        raise PrecisionError(f"device must be one of {', '.join(DEVICES)}, not {setting!r}")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise PrecisionError("device cuda asked for, but torch sees no CUDA GPU here; use auto or cpu")
    return setting


def use_hardware(params: dict) -> Hardware:
    """Resolve params.yaml's `device` and `precision` for this stage's process; every model a stage loads
    (`load_causal_lm`, `RewardModel.load`, `to_device`) goes to that device from then on."""
    global _device
    missing = [k for k in ("device", "precision") if k not in params]
    if missing:
        raise ParamsError(f"params.yaml has no `{'`, `'.join(missing)}` (top level)")
    device = resolve_device(params["device"])
    hardware = Hardware(device, resolve_precision(params["precision"], device))
    _device = device
    return hardware


def current_device() -> torch.device:
    """The device `use_hardware` chose; under a multi-process launch, this process's GPU (LOCAL_RANK)."""
    import os

    if _device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(_device)


def to_device(model: PreTrainedModel) -> PreTrainedModel:
    """`model` on the stage's device (a no-op on the CPU)."""
    return model.to(current_device())


def trainer_device(device: str) -> dict[str, bool]:
    """The transformers/TRL TrainingArguments switch for a resolved device: the CPU said explicitly (else HF picks a
    GPU it can see), nothing forced otherwise."""
    return {"use_cpu": device == "cpu"}


def trainer_precision(precision: str) -> dict[str, bool]:
    """The transformers/TRL TrainingArguments switches for a resolved precision. TRL's SFTConfig and RewardConfig
    default to bf16=True, so fp32 must be said explicitly."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def autocast(precision: str, device: str | None = None):
    """A context that runs forwards in the resolved precision (our own PPO and evaluation code); fp32: no autocast."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(
        device or current_device().type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, wrapped as an HF fast tokenizer (EOS doubles as BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None)


def build_tiny_model(arch: str, shape: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A randomly initialised GPT-2 or Llama causal LM of the given shape."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=shape.max_positions,
            n_embd=shape.n_embd,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            resid_pdrop=shape.dropout,
            embd_pdrop=shape.dropout,
            attn_pdrop=shape.dropout,
            **ids,
        )
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.n_embd,
            intermediate_size=4 * shape.n_embd,
            num_hidden_layers=shape.n_layer,
            num_attention_heads=shape.n_head,
            max_position_embeddings=shape.max_positions,
            attention_dropout=shape.dropout,
            **ids,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown tiny architecture {arch!r}: use tiny-gpt2 or tiny-llama")


def create_base_model(
    name: str, shape: TinyModelConfig, texts: Sequence[str], out_dir: Path, seed: int, trust_remote_code: bool = False
) -> Path:
    """Materialise the starting model in HF format under `out_dir` and return its path.

    `name` is `tiny-gpt2` / `tiny-llama` (built from `shape`, tokenizer trained on `texts`), a pretrained model by name
    or GGUF file (stages/lib/pretrained.py), a local folder, or a hub name. Hub and local models load with
    safetensors only; remote code runs only if the user allows it.
    """
    if name.startswith(TINY_PREFIX):
        seed_everything(seed)
        tokenizer = train_tokenizer(texts, shape.vocab_size)
        model = build_tiny_model(name.removeprefix(TINY_PREFIX), shape, tokenizer)
    else:
        source = pretrained.resolve(name)  # a GGUF model: its cached safetensors folder
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, trust_remote_code=trust_remote_code)
        pretrained.distinct_pad(tokenizer, model)  # causal LMs often ship without one, or with the EOS
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_causal_lm(path: str | Path, trust_remote_code: bool = False) -> tuple[PreTrainedModel, Any]:
    """A causal LM and its tokenizer from an HF folder or name (safetensors only), tokenizer padded on the left."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code)
    return to_device(model), tokenizer


def peft_config(lora: LoraSettings, task_type: str, model: PreTrainedModel):
    """A peft LoraConfig targeting the modules of `lora.target_modules` that this model has, or None if disabled."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in lora.target_modules if m in present]
    if not targets:
        raise ValueError(f"LoRA target modules {lora.target_modules} not found in the model")
    blocks = model.config.num_hidden_layers
    top = None if lora.layers is None or lora.layers >= blocks else list(range(blocks - lora.layers, blocks))
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=top,
        task_type=task_type,
    )


def context_limit(model: PreTrainedModel, wanted: int) -> int:
    """`wanted` tokens, capped at the model's maximum sequence length (position embeddings)."""
    config = model.config.get_text_config()
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or wanted
    return min(wanted, limit)


def model_context(model: PreTrainedModel, tokenizer: Any) -> int:
    """The context a model is given: its position limit, capped by the one it was fine-tuned at, which the training
    stages record as the saved tokenizer's `model_max_length` (`keep_context`). A pretrained chat model knows 8192
    positions; the real profile fine-tunes it at 256, so its rollouts, samples and the reward model's scores stay in
    the window it learned (and the cost of a step stays that of 256 tokens, not of a whole long dialogue)."""
    return context_limit(model, int(tokenizer.model_max_length))  # HF's default when unrecorded: int(1e30)


def keep_context(tokenizer: Any, max_length: int) -> None:
    """Record on the tokenizer the context a stage trained at (saved with it in tokenizer_config.json)."""
    tokenizer.model_max_length = max_length


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generation uses them. (B, L) -> (B, L)."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def fuse_gelu(model: torch.nn.Module) -> None:
    """Swap GPT-2's `gelu_new` (tanh GELU written as ~8 Python element-wise ops) for the same tanh approximation in
    one fused kernel (`gelu_pytorch_tanh`), in place; outputs agree to float rounding (~1e-7). The config is left
    alone, so a saved model still names `gelu_new` and loads as before.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(parent, name, GELUTanh())


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Generation:
    """Sampled replies: the decoded, stripped texts, whether each ended (emitted EOS within the new tokens; the
    others were cut off), and how many prompts had to be shortened to fit the context."""

    replies: list[str]
    ended: list[bool]
    truncated: int = 0


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> Generation:
    """Sample one reply per prompt (left-padded batches, KV cache), seeded; the caller's RNG state is left as it was.

    Each prompt is first fitted into the context budget (stages/lib/context.py): at most `context - max_new_tokens`
    tokens, keeping its last turns, so the sequence never indexes past the model's position embeddings.
    Training sequences are `prompt + reply_prefix + reply + EOS` (stages/lib/context.py: the chat template's cue, or
    the HH text and a space that byte-level BPE keeps with the reply's first token), so the prompt alone is exactly
    the context the model was trained on.
    """
    from stages.lib.context import fit_prompts

    model.eval()
    window = model_context(model, tokenizer)
    max_new_tokens = min(max_new_tokens, window - 1)
    prompts, truncated = fit_prompts(tokenizer, prompts, window - max_new_tokens)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    replies: list[str] = []
    ended: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        do_sample = temperature > 0
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        ended += (new == tokenizer.eos_token_id).any(dim=1).tolist()
    torch.random.set_rng_state(generator_state)
    return Generation(replies, ended, truncated)
