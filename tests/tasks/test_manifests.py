"""The manifests EKS recovery and a region failover deploy: overrides (replicas, image registry), the Secrets they
need, and bad manifests refused in one line."""

from __future__ import annotations

import pytest

from drplan.errors import DrplanError
from drplan.plan import ManifestOverrides
from tasks.manifests import load_manifests, secret_refs, with_overrides
from tests.helpers import REPO

MANIFESTS = REPO / "kubernetes" / "manifests"


def test_overrides_change_replicas_and_registry_only():
    api = next(o for o in load_manifests(MANIFESTS) if o["metadata"]["name"] == "devonn-api")
    changed = with_overrides(api, ManifestOverrides(replicas={"devonn-api": 1},
                                                     image_registry={"registry.example/devonn": "ecr.dr/devonn"}))
    assert changed["spec"]["replicas"] == 1
    assert changed["spec"]["template"]["spec"]["containers"][0]["image"] == "ecr.dr/devonn/devonn-api:1.0"
    assert api["spec"]["replicas"] == 3  # the loaded manifest is not modified
    assert with_overrides(api, ManifestOverrides(image_registry={"registry.exam": "x"})) == api  # prefix of a name
    assert secret_refs([api]) == {"devonn-api-db", "devonn-api-token"}


@pytest.mark.parametrize(("text", "message"), [
    ("kind: Deployment\nmetadata: {name: x\n", "not valid YAML"),
    ("apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\n", "Secret creds is not deployable here"),
])
def test_bad_manifests_are_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(DrplanError, match=message) as refused:
        load_manifests(tmp_path)
    assert "\n" not in str(refused.value) and str(tmp_path / "bad.yaml") in str(refused.value)
