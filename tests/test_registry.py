"""stages.lib.registry and the promote stage's registration: policies are logged from code (no pickled class), read back
as their safetensors HF folder, and anything this pipeline did not register is refused without being unpickled.

A tiny random-init GPT-2 (no training) in a throw-away SQLite registry; a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from stages.lib.modeling import TinyModelConfig, create_base_model, load_causal_lm
from stages.lib.outcome import BadInput
from stages.lib.params import defaults
from stages.lib.registry import MODEL_HASH_TAG, fetch_policy, model_hash
from stages.promote import find_or_register

MARKER = "unpickled.marker"


class Booby(mlflow.pyfunc.PythonModel):
    """A foreign model whose pickle runs code when it is loaded (writes MARKER in the working directory)."""

    def __reduce__(self):  # noqa: ANN204
        return (open, (MARKER, "w"))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        return model_input


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("registry")
    texts = [f"What is {i} plus {i}? It is {2 * i}." for i in range(50)]
    hf = create_base_model(
        "tiny-gpt2",
        defaults(TinyModelConfig, n_layer=1, n_embd=16, n_head=1, vocab_size=300, max_positions=64),
        texts,
        root / "policy",
        seed=0,
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_experiment("registry-test")
    client = mlflow.MlflowClient()
    with mlflow.start_run():
        ours = find_or_register(client, "rlhf-policy", hf, model_hash(hf), {"rlhf.source_run_id": "test"})
        info = mlflow.pyfunc.log_model(name="foreign", python_model=Booby(), pip_requirements=["mlflow"])
    foreign = mlflow.register_model(info.model_uri, "foreign-model")
    yield {"root": root, "hf": hf, "client": client, "ours": ours, "foreign": foreign}
    mlflow.set_tracking_uri(previous)


def test_a_registered_policy_is_served_from_code(registry: dict, tmp_path: Path) -> None:
    ours = registry["ours"]
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/rlhf-policy/{ours.version}", dst_path=str(tmp_path)))
    assert not list(model_dir.rglob("*.pkl")), sorted(p.name for p in model_dir.rglob("*"))  # models-from-code
    assert "served_policy.py" in (model_dir / "MLmodel").read_text()
    replies = mlflow.pyfunc.load_model(f"models:/rlhf-policy/{ours.version}").predict(["What is 2 plus 3?"])
    assert isinstance(replies, list) and len(replies) == 1 and isinstance(replies[0], str)


def test_fetch_policy_reads_the_safetensors_folder_it_registered(registry: dict, tmp_path: Path) -> None:
    folder = fetch_policy(f"models:/rlhf-policy/{registry['ours'].version}", tmp_path)
    assert model_hash(folder) == model_hash(registry["hf"]) == registry["ours"].tags[MODEL_HASH_TAG]
    model, tokenizer = load_causal_lm(folder)
    assert model.config.n_layer == 1 and tokenizer.pad_token is not None
    registry["client"].set_registered_model_alias("rlhf-policy", "champion", registry["ours"].version)
    assert fetch_policy("models:/rlhf-policy@champion", tmp_path / "alias").is_dir()


@pytest.mark.parametrize("trust", [False, True])
def test_a_foreign_model_is_refused_and_never_unpickled(
    registry: dict, tmp_path: Path, trust: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as info:
        fetch_policy(f"models:/foreign-model/{registry['foreign'].version}", tmp_path / "dl", trust=trust)
    message = str(info.value)
    assert "\n" not in message and "foreign-model" in message
    assert ("--trust-model" in message) if not trust else ("no `hf_model` folder with safetensors" in message)
    assert not (tmp_path / MARKER).exists()
    if not trust:  # the control: what `rlhf eval --model-uri` did before, mlflow.pyfunc.load_model, runs the pickle
        with pytest.raises(Exception):  # noqa: B017 (whatever the unpickled object breaks afterwards)
            mlflow.pyfunc.load_model(f"models:/foreign-model/{registry['foreign'].version}")
        assert (tmp_path / MARKER).exists()


def test_tampered_weights_are_refused(registry: dict, tmp_path: Path) -> None:
    client, version = registry["client"], registry["ours"].version
    client.set_model_version_tag("rlhf-policy", version, MODEL_HASH_TAG, "0" * 20)
    try:
        with pytest.raises(BadInput, match="its weights do not match its rlhf.model_hash tag"):
            fetch_policy(f"models:/rlhf-policy/{version}", tmp_path)
    finally:
        client.set_model_version_tag("rlhf-policy", version, MODEL_HASH_TAG, registry["ours"].tags[MODEL_HASH_TAG])


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/no-such-model/1", "cannot load models:/no-such-model/1"),
        ("models:/rlhf-policy@nobody", "cannot load models:/rlhf-policy@nobody"),
        ("runs:/abc/policy", "is not a registered model's URI"),
        ("/tmp/some/folder", "is not a registered model's URI"),
    ],
)
def test_unknown_uris_are_one_line(registry: dict, tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(BadInput, match=message) as info:
        fetch_policy(uri, tmp_path)
    assert "\n" not in str(info.value)
