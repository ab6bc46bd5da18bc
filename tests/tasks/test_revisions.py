"""The pure parts of tasks/revisions.py: what a pod template references, what differs between two revisions (key
names, never values; a rollout restart is no difference), and picking a known-good revision."""

from __future__ import annotations

import pytest

from drplan.errors import DrplanError
from drplan.timeutil import utcnow
from tasks.k8s import RESTARTED_AT
from tasks.revisions import KnownGood, Revision, pick_known_good, references, with_restart_of


def template(image: str = "devonn-api:1.0", restarted: str | None = None) -> dict:
    meta = {"labels": {"app": "devonn-api"}} | ({"annotations": {RESTARTED_AT: restarted}} if restarted else {})
    return {"metadata": meta, "spec": {"containers": [{"name": "app", "image": image, "env": [
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "devonn-api-db", "key": "DATABASE_URL"}}},
        {"name": "ORDERS_TABLE", "valueFrom": {"configMapKeyRef": {"name": "devonn-api-config", "key": "T"}}}],
        "envFrom": [{"secretRef": {"name": "extra"}}]}], "volumes": [{"name": "v", "configMap": {"name": "files"}}]}}


def test_references_cover_env_env_from_and_volumes():
    assert references(template()) == ({"devonn-api-config", "files"}, {"devonn-api-db", "extra"})


def test_differences_name_images_and_config_keys_never_values_and_ignore_a_restart():
    good = Revision(template=template(restarted="a"), configmaps={"devonn-api-config": {"T": "orders", "U": "1"}})
    assert good.differences(good.model_copy(update={"template": template(restarted="b")})) == []
    bad = Revision(template=template("devonn-api:broken"), configmaps={"devonn-api-config": {"T": "secret-ish",
                                                                                            "U": "1"}})
    changes = good.differences(bad)
    assert changes == ["image devonn-api:1.0 -> devonn-api:broken", "ConfigMap devonn-api-config keys T"]
    assert "secret-ish" not in " ".join(changes)


def test_a_target_keeps_the_live_restart_stamp():
    assert with_restart_of(template(restarted="old"), template(restarted="live")) == template(restarted="live")
    assert with_restart_of(template(restarted="old"), template()) == template()


def test_pick_known_good_refuses_a_revision_the_history_lacks():
    history = [KnownGood(template=template(), revision=n, recorded_at=utcnow(), reason="test") for n in (3, 4)]
    assert pick_known_good(history, "devonn-api", None).revision == 4
    assert pick_known_good(history, "devonn-api", 3).revision == 3
    with pytest.raises(DrplanError, match="^deployment devonn-api has no known-good revision 9; it keeps 3, 4$"):
        pick_known_good(history, "devonn-api", 9)
    with pytest.raises(DrplanError, match="has no known-good revision yet"):
        pick_known_good([], "devonn-api", None)
