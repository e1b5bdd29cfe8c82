"""Alerts: a Prefect notification block (a webhook) and automations that use it.

Per config (``name`` is the config's name):

    <name>: alert on failed retrain       ``prefect.flow-run.Failed`` / ``Crashed`` of a run tagged
                                          ``model:<registry.model_name>`` (every deployment of the model)
    <name>: alert on quarantined batch    ``tuneflow.batch.quarantined`` on ``tuneflow.dataset.<name>``,
                                          emitted by the validate stage of any retrain (deployed or not)

The automations live on the Prefect server and run there: the server's automation service sends the
notification, so alerts keep coming when no ``tuneflow serve`` runs (team mode: create them once with
``tuneflow alerts --config ...``). The webhook URL (``alerts.webhook_url`` or the environment variable
``alerts.webhook_url_env``) is stored as a secret field of the block: the UI, logs and API show it masked.
"""

from __future__ import annotations

import logging
from typing import Any

from tuneflow.config import PipelineConfig
from tuneflow.watch import QUARANTINED_EVENT, resource_id

log = logging.getLogger(__name__)

FAILED_BODY = (
    "Retrain {{ flow_run.name }} of {model} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "Flow run: {{ (flow_run|ui_url) or ('id ' ~ flow_run.id ~ ' (no UI URL: set PREFECT_UI_URL on the server)') }}"
)
QUARANTINED_BODY = "{{ event.payload.message }}\nFlow run: {{ event.payload.flow_run_url }}"


def block_name(cfg: PipelineConfig) -> str:
    return f"tuneflow-alerts-{cfg.name}".lower().replace("_", "-")


def automation_names(cfg: PipelineConfig) -> dict[str, str]:
    return {
        "failed": f"{cfg.name}: alert on failed retrain",
        "quarantined": f"{cfg.name}: alert on quarantined batch",
    }


def save_webhook_block(cfg: PipelineConfig, url: str) -> Any:
    """The notification block (overwritten on every call, so a changed URL takes effect)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=block_name(cfg),
        url="{{webhook_url}}",  # filled from the secrets at send time: the URL itself is never shown
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "tuneflow"},
        secrets={"webhook_url": url},
    )
    block.save(block_name(cfg), overwrite=True)
    return block


def ensure_alerts(cfg: PipelineConfig) -> list[str]:
    """Create (or replace) the notification block and the automations of ``cfg``; returns the automations'
    names, or [] when no webhook URL is configured. Needs ``PREFECT_API_URL`` (a server that keeps them)."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    a = cfg.alerts
    url = a.url()
    if url is None:
        log.info(
            "%s: no alerts (set %s or alerts.webhook_url to get failed retrains and quarantined batches posted)",
            cfg.name,
            a.webhook_url_env,
        )
        return []
    block = save_webhook_block(cfg, url)
    block_id = block._block_document_id
    model = cfg.registry.model_name
    names = automation_names(cfg)

    def alert(name: str, what: str, subject: str, body: str, **trigger: Any) -> Automation:
        return Automation(
            name=name,
            description=f"Post to the {block_name(cfg)} webhook when {what}",
            trigger=EventTrigger(posture=Posture.Reactive, threshold=1, **trigger),
            actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)],
        )

    wanted = []
    if a.on_failure:
        wanted.append(
            alert(
                names["failed"],
                f"a retrain of {model} fails or crashes",
                f"tuneflow: retrain of {model} failed",
                FAILED_BODY.replace("{model}", model),
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.model:{model}"},
            )
        )
    if a.on_quarantine:
        wanted.append(
            alert(
                names["quarantined"],
                f"batches of {cfg.name} are quarantined",
                f"tuneflow: batch(es) of {cfg.name} quarantined",
                QUARANTINED_BODY,
                expect={QUARANTINED_EVENT},
                match={"prefect.resource.id": resource_id(cfg.name)},
            )
        )
    for name in names.values():  # replace, never duplicate: serve may start many times
        while True:
            try:
                Automation.read(name=name).delete()
            except ValueError:
                break
    for automation in wanted:
        automation.create()
        log.info("automation %r posts to the %s block", automation.name, block_name(cfg))
    return [automation.name for automation in wanted]
