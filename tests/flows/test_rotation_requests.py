"""What `drplan rotate-credentials` refuses before anything runs (no servers: the plan alone)."""

from __future__ import annotations

import pytest
import yaml

from drplan.errors import DrplanError
from drplan.plan import PLANS_DIR, load_plan
from flows.credential_rotation import chosen


@pytest.fixture
def plan_with(tmp_path):
    def make(change) -> object:
        data = yaml.safe_load((PLANS_DIR / "sandbox.yaml").read_text())
        change(data)
        path = tmp_path / "plan.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_plan(path)
    return make


def test_the_database_or_the_service_is_chosen(plan_with):
    plan = plan_with(lambda d: None)
    assert chosen(plan, "devonn-postgres", "") is plan.database("devonn-postgres")
    assert chosen(plan, "", "devonn-api").name == "devonn-api"


@pytest.mark.parametrize(("change", "database", "service", "line"), [
    (None, "", "", "name exactly one of --database NAME (its password) or --service NAME (its API token)"),
    (None, "devonn-postgres", "devonn-api", "name exactly one of --database NAME"),
    (None, "", "devonn-worker", "service devonn-worker has no API token (services[].token_secret)"),
    (None, "", "nope", "unknown service 'nope'; the plan defines: devonn-api, devonn-worker"),
    (lambda d: d["databases"][1].update(credentials_secret="devonn/db/admin"), "devonn-postgres", "",
     "secret devonn/db/admin also holds the credentials of devonn-rds: a new password for devonn-postgres would "
     "lock drplan out of them"),
    (lambda d: d["databases"][0].update(credentials_secret="prefect:db-admin"), "devonn-postgres", "",
     "secret prefect:db-admin is a Prefect Secret block: drplan rotates Secrets Manager secrets only"),
])
def test_refused_in_one_line(plan_with, change, database, service, line):
    plan = plan_with(change or (lambda d: None))
    with pytest.raises(DrplanError) as refused:
        chosen(plan, database, service)
    assert line in str(refused.value) and "\n" not in str(refused.value)
