"""Beyond one machine, on paper and in config (issue 14, item 7): the Kubernetes work pool's job template and the
multi-node accelerate configs are checked here as far as this machine can (no cluster, no GPU, one node)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

TEMPLATE = ROOT / "docker/k8s/base-job-template.json"


def _deployment(name: str) -> dict:
    return next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == name)


def test_kubernetes_job_template_renders_gpu_requests_and_the_stage_image():
    """Prefect's own templating, as a Kubernetes worker applies it: the pool's defaults, then the deployment's job
    variables; the Job requests the GPUs, CPU and memory, runs the stage image and mounts a RAM /dev/shm."""
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(TEMPLATE.read_text())
    variables = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables), used - set(variables)  # every placeholder is a declared variable

    deployment = _deployment("rlhf-kubernetes-gpu")
    assert deployment["work_pool"]["name"] == "rlhf-kubernetes"
    values = {k: v.get("default") for k, v in variables.items()} | deployment["work_pool"]["job_variables"]
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"].endswith("rlhf-stage:cuda")
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 1 == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert container["resources"]["requests"]["memory"] == "32Gi" and pod["nodeSelector"] == {
        "nvidia.com/gpu.present": "true"
    }
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory" and job["spec"]["backoffLimit"] == 0
    assert "{{" not in json.dumps({k: v for k, v in job.items()})  # nothing left unrendered

    steps = [next(iter(s)) for s in deployment["pull"]]
    assert steps == [
        "prefect.deployments.steps.git_clone",
        "prefect.deployments.steps.set_working_directory",
        "prefect.deployments.steps.run_shell_script",
    ]
    assert "dvc pull" in deployment["pull"][2]["prefect.deployments.steps.run_shell_script"]["script"]
    assert deployment["work_pool"]["job_variables"]["env"]["MLFLOW_TRACKING_URI"].startswith("http")


@pytest.mark.parametrize("path", sorted((ROOT / "docker/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_multi_node_ones_add_up(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader (it rejects unknown keys)
    assert config.num_processes >= 1
    if config.num_machines > 1:
        assert config.num_processes % config.num_machines == 0 and config.main_process_ip and config.main_process_port
        assert config.mixed_precision == "bf16" and config.rdzv_backend == "static"
        assert re.search(r"--machine_rank", path.read_text()) or "multi_node_gpu.yaml" in path.read_text()
