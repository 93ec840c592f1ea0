#!/usr/bin/env bash
# SFT, reward-model and PPO steps at SmolLM2-135M's shape on this machine's device (a GPU if torch sees one, else
# the CPU), written to one JSON (benchmarks/gpu_check.py says what is measured). Finishes in under 10 minutes.
#   benchmarks/gpu_check.sh [OUT.json]
# On a machine without the project's venv (a lent GPU machine), the python with torch and transformers runs it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
exec timeout 590 "$python" "$here/gpu_check.py" --out "${1:-$here/gpu_check_results.json}"
