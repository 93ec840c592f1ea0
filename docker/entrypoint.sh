#!/bin/sh
# The stage image's entry point: `docker run IMAGE <stage>` runs one dvc.yaml stage in the mounted workspace.
set -e

usage() {
    cat <<'TXT'
usage: docker run [options] IMAGE <stage> [stage args]   run one stage (python -m stages.<stage>) in the workspace
       docker run [options] IMAGE repro <stage>          the same through DVC: skipped if nothing changed, dvc.lock updated
       docker run [options] IMAGE rlhf|dvc|mlflow|prefect|python ...   any of the tools

The workspace (the project: params.yaml, data/, artifacts/, dvc.yaml) is the working directory, /workspace unless -w
says otherwise. Pass the MLflow tracking URI in, e.g.
  docker run --rm -v "$PWD:/workspace" --user "$(id -u):$(id -g)" \
      -e MLFLOW_TRACKING_URI=sqlite:////workspace/mlflow.db rlhf-stage:cpu validate
Stages: validate, sft, reward, reward_gate, ppo, evaluate, promote (dvc.yaml). Exit codes: 0 ok, 1 crash, 3 a gate
stopped the stage, 4 training diverged, 64 usage, 65 bad data or params (stages/lib/outcome.py).
TXT
}

case "${1:-}" in
    "" | -h | --help) usage; exit 0 ;;
    repro) shift; exec dvc repro --single-item "$@" ;;
    rlhf | dvc | mlflow | prefect | python | python3 | sh | bash | accelerate) exec "$@" ;;
esac

stage="$1"; shift
case "$stage" in
    *[!a-z_]*) ;;  # not a module name
    *) if python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("stages." + sys.argv[1]) is None)' \
           "$stage" 2>/dev/null; then exec python -m "stages.$stage" "$@"; fi ;;
esac
echo "error: '$stage' is not a stage or a tool of this image (see: docker run IMAGE --help)" >&2
exit 64
