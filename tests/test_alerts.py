"""Alert automations on a real (temporary) Prefect server: created from the config, replaced rather than
duplicated, the webhook URL kept as a secret; and `tuneflow alerts` says what it needs."""

from __future__ import annotations

import pytest

from tuneflow.cli import main
from tuneflow.config import PipelineConfig

from conftest import tiny_config_dict

URL = "http://127.0.0.1:9/hooks/tok-secret-123"


@pytest.fixture
def cfg(tmp_path, tiny_model_dir):
    return PipelineConfig.model_validate(tiny_config_dict(tmp_path / "data.csv", tiny_model_dir))


def _automations(prefix: str) -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [a for a in client.read_automations() if a.name.startswith(prefix)]


def test_serve_creates_one_automation_per_alert_and_keeps_the_url_secret(cfg, prefect_harness, monkeypatch):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from tuneflow.flows.alerts import automation_names, block_name, ensure_alerts
    from tuneflow.watch import QUARANTINED_EVENT

    monkeypatch.setenv("TUNEFLOW_ALERT_WEBHOOK_URL", URL)
    ensure_alerts(cfg)
    names = ensure_alerts(cfg)  # tuneflow serve starts again: replaced, not duplicated
    assert names == list(automation_names(cfg).values())
    found = _automations(f"{cfg.name}: alert")
    assert sorted(a.name for a in found) == sorted(names)
    by_name = {a.name: a for a in found}
    failed = by_name[f"{cfg.name}: alert on failed retrain"]
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert "prefect.tag.model:tiny-clf" in str(failed.trigger.match_related)
    quarantined = by_name[f"{cfg.name}: alert on quarantined batch"]
    assert quarantined.trigger.expect == {QUARANTINED_EVENT}
    decay = by_name[f"{cfg.name}: alert on decay"]
    assert decay.trigger.expect == {"tuneflow.champion.degraded"}
    assert "tuneflow.model.tiny-clf" in str(decay.trigger.match)
    assert "event.payload.message" in decay.actions[0].body
    review = by_name[f"{cfg.name}: alert on review needed"]  # registry.approval: required
    assert review.trigger.expect == {"tuneflow.review.requested"} and "tuneflow.model.tiny-clf" in str(
        review.trigger.match
    )
    assert "event.payload.version_url" in review.actions[0].body
    block = CustomWebhookNotificationBlock.load(block_name(cfg))
    assert block.url == "{{webhook_url}}" and URL not in block.model_dump_json()  # shown masked
    assert block.secrets.get_secret_value()["webhook_url"] == URL
    assert all(str(a.actions[0].block_document_id) == str(block._block_document_id) for a in found)


def test_no_url_no_automation(cfg, prefect_harness, monkeypatch):
    from tuneflow.flows.alerts import ensure_alerts

    monkeypatch.delenv("TUNEFLOW_ALERT_WEBHOOK_URL", raising=False)
    cfg = cfg.model_copy(update={"name": "no-alerts"})
    assert ensure_alerts(cfg) == []
    assert _automations("no-alerts") == []


def test_only_the_wanted_alerts_and_the_digest_ignores_them(cfg, prefect_harness):
    from tuneflow.flows.alerts import ensure_alerts

    other = PipelineConfig.model_validate(
        cfg.model_dump()
        | {
            "name": "only-failed",
            "alerts": {"webhook_url": URL, "on_quarantine": False, "on_decay": False, "on_review": False},
        }
    )
    assert ensure_alerts(other) == ["only-failed: alert on failed retrain"]
    assert other.digest() == cfg.model_copy(update={"name": "only-failed"}).digest()  # alerts do not shape a model


def test_alerts_command_needs_a_server_and_a_url(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["alerts"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err


def test_the_crash_detection_automation_is_created_once_and_proactive(prefect_harness):
    from prefect.client.schemas.objects import StateType

    from tuneflow.flows.alerts import CRASH_AUTOMATION, ensure_crash_detection

    ensure_crash_detection()
    assert ensure_crash_detection(within_seconds=120) == CRASH_AUTOMATION  # run again: replaced, not duplicated
    (found,) = _automations(CRASH_AUTOMATION)
    assert found.trigger.posture.value == "Proactive" and found.trigger.within.total_seconds() == 120
    assert found.trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= found.trigger.expect
    assert found.actions[0].state == StateType.CRASHED
