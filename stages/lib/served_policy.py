"""The registered policy as an MLflow pyfunc, logged from code (MLflow's models-from-code): the promote stage passes
this file's path as `python_model`, so loading or serving a registered policy runs this file and reads the HF folder
logged beside it (artifact `hf_model`, safetensors only). No pickled class is involved.

    policy = mlflow.pyfunc.load_model("models:/rlhf-policy@champion")
    policy.predict(["What is 2 plus 3?"])          # greedy; params={"temperature": 0.7, "max_new_tokens": 48}

Nothing in `stages` imports this module: MLflow runs it, with the `stages` package on its path (`code_paths`).
"""

from __future__ import annotations

from typing import Any

import mlflow


class PolicyModel(mlflow.pyfunc.PythonModel):
    """`predict(["prompt", ...])` (or a DataFrame with a `prompt` column) -> replies."""

    def load_context(self, context) -> None:  # noqa: ANN001
        from stages.lib.modeling import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(context.artifacts["hf_model"])  # safetensors only

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:  # noqa: ANN001
        from stages.lib.modeling import generate
        from stages.lib.schema import render_prompt

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        p = params or {}
        return generate(
            self.model,
            self.tokenizer,
            [render_prompt(x) for x in prompts],
            int(p.get("max_new_tokens", 48)),
            float(p.get("temperature", 0.0)),
        ).replies


mlflow.models.set_model(PolicyModel())
