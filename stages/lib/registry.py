"""Policies this pipeline registered in the MLflow Model Registry, read back without unpickling anything.

The promote stage registers a policy as a pyfunc logged from code (stages/lib/served_policy.py: serving it runs that
file, no pickled class), with the policy's HF folder as its artifact `hf_model` and the sha256 of its safetensors
as the version's tag `rlhf.model_hash`. Evaluating a registered model (`rlhf eval --model-uri`) and comparing a
candidate with the champion read only that folder: `fetch_policy` downloads the version's files and checks them,
and the caller loads the folder with transformers (`use_safetensors=True`, no remote code). `mlflow.pyfunc.load_model`
is never called here: for a model logged with a pickled class (cloudpickle), loading it runs whatever the pickle says.

A version is refused (BadInput, one line) when it lacks the tag (not registered by this pipeline) or its weights do
not match the tag, unless the caller trusts it (`rlhf eval --trust-model`); a folder without safetensors weights, or
with pickled weights beside them, is refused even then.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from stages.lib.outcome import BadInput

MODEL_HASH_TAG = "rlhf.model_hash"
HF_ARTIFACT = "hf_model"
SERVED_POLICY = Path(__file__).with_name("served_policy.py")  # logged as the pyfunc's code (models-from-code)
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")


def model_hash(hf_dir: Path) -> str:
    """The identity of a policy's weights: sha256 over its safetensors files (sorted by name), 20 hex digits."""
    h = hashlib.sha256()
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with open(f, "rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):  # noqa: B023 (used at once)
                h.update(block)
    return h.hexdigest()[:20]


def resolve_version(client: Any, uri: str) -> Any:
    """The model version that `models:/NAME/VERSION` or `models:/NAME@ALIAS` names; BadInput otherwise."""
    import mlflow

    m = MODEL_URI.match(uri)
    if m is None:
        raise BadInput(f"{uri} is not a registered model's URI: give models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if m["version"]:
            return client.get_model_version(m["name"], m["version"])
        return client.get_model_version_by_alias(m["name"], m["alias"])
    except mlflow.exceptions.MlflowException as e:
        raise BadInput(f"cannot load {uri}: {str(e).splitlines()[0]}") from None


def _hf_folder(model_dir: Path, uri: str) -> Path | None:
    """The `hf_model` artifact's folder inside a downloaded pyfunc model, from its MLmodel file (read as YAML)."""
    import yaml

    try:
        spec = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8")) or {}
        path = spec["flavors"]["python_function"]["artifacts"][HF_ARTIFACT]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    folder = (model_dir / str(path)).resolve()
    return folder if folder.is_dir() and model_dir.resolve() in folder.parents else None


def fetch_policy(uri: str, dest: Path, trust: bool = False) -> Path:
    """Download the registered policy `uri` into `dest` and return its HF folder, checked: registered by this
    pipeline (tag rlhf.model_hash) with exactly those safetensors weights, unless `trust`; safetensors weights and
    no pickled ones, always. Nothing is loaded or unpickled here."""
    import mlflow

    client = mlflow.MlflowClient()
    version = resolve_version(client, uri)
    what = f"{uri} (version {version.version} of {version.name})"
    digest = version.tags.get(MODEL_HASH_TAG)
    if not digest and not trust:
        raise BadInput(
            f"{what} was not registered by this pipeline (no {MODEL_HASH_TAG} tag); pass --trust-model "
            "to evaluate it anyway (its safetensors weights only)"
        )
    try:
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(dest)
            )
        )
    except mlflow.exceptions.MlflowException as e:
        raise BadInput(f"cannot load {uri}: {str(e).splitlines()[0]}") from None
    folder = _hf_folder(model_dir, uri)
    if folder is None or not any(folder.glob("*.safetensors")):
        raise BadInput(
            f"{what} has no `{HF_ARTIFACT}` folder with safetensors weights: it was not registered by "
            "this pipeline, and only such a folder is loaded"
        )
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise BadInput(f"{what} holds pickled weights ({', '.join(pickled)}) beside its safetensors: refused")
    if digest and not trust and model_hash(folder) != digest:
        raise BadInput(f"{what}: its weights do not match its {MODEL_HASH_TAG} tag ({digest}); refused")
    return folder
