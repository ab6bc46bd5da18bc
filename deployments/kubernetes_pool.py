"""The production work pool's base job template: prefect-kubernetes' default (its variables and their schema) with
the defaults and the Job manifest of prefect.yaml's `definitions.kubernetes_pool`.

    python -m deployments.kubernetes_pool --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/drplan:1.4.0 \\
        > drplan-pool.json
    prefect work-pool create drplan --type kubernetes --base-job-template drplan-pool.json   # or: update
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import typer
import yaml

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def pool_definition(config: Path = PREFECT_YAML) -> dict[str, Any]:
    return yaml.safe_load(config.read_text())["definitions"]["kubernetes_pool"]


def base_job_template(image: str | None = None, config: Path = PREFECT_YAML, **defaults: Any) -> dict[str, Any]:
    """The pool's base job template; `image` and `defaults` (variable names) override prefect.yaml's defaults."""
    from prefect_kubernetes.worker import KubernetesWorker

    pool = pool_definition(config)
    template = KubernetesWorker.get_default_base_job_template()
    template["job_configuration"]["job_manifest"] = copy.deepcopy(pool["job_manifest"])
    properties = template["variables"]["properties"]
    values = {**pool["variables"], **({"image": image} if image else {}), **defaults}
    unknown = sorted(set(values) - set(properties))
    if unknown:
        raise ValueError(f"kubernetes_pool.variables: no such prefect-kubernetes variable: {', '.join(unknown)}")
    for name, value in values.items():
        properties[name]["default"] = value
    return template


def main(image: str = typer.Option(..., "--image", help="The drplan image (Dockerfile), e.g. from ECR."),
         namespace: str = typer.Option(None, "--namespace", help="Default: prefect.yaml's."),
         service_account: str = typer.Option(None, "--service-account", help="Default: prefect.yaml's.")) -> None:
    """Print the base job template of the `drplan` Kubernetes work pool as JSON."""
    overrides = {k: v for k, v in {"namespace": namespace, "service_account_name": service_account}.items() if v}
    print(json.dumps(base_job_template(image, **overrides), indent=2))


if __name__ == "__main__":
    typer.run(main)
