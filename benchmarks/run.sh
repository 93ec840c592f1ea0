#!/usr/bin/env bash
# One command: build the TRL 1.9.0 venv if missing, then run our PPO and TRL's side by side.
#   benchmarks/run.sh                          # shapes A and B, 2 alternating runs each, 4 measured batches per run
#   benchmarks/run.sh --shapes A --batches 3   # extra arguments go to ppo_vs_trl.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv-trl"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import trl.experimental.ppo" 2>/dev/null; then
    # torch first, from the local CPU wheel; then trl with torch pinned, or pip resolves a multi-GB CUDA build.
    # TRL gets its own transformers/accelerate resolution: it stays out of the project's environment.
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
    constraints="$(mktemp)"
    echo "torch==2.13.0" > "$constraints"
    "$venv/bin/pip" install -q -c "$constraints" trl==1.9.0
    rm -f "$constraints"
fi

export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
exec "$root/.venv/bin/python" "$here/ppo_vs_trl.py" --trl-python "$venv/bin/python" --profile "$@"
