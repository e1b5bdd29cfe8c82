"""Alerts: a Prefect notification block (a webhook) and automations that use it.

Per config (``name`` is the config's name):

    <name>: alert on failed retrain       ``prefect.flow-run.Failed`` / ``Crashed`` of a run tagged
                                          ``model:<registry.model_name>`` (every deployment of the model)
    <name>: alert on quarantined batch    ``tuneflow.batch.quarantined`` on ``tuneflow.dataset.<name>``,
                                          emitted by the validate stage of any retrain (deployed or not)
    <name>: alert on decay                ``tuneflow.champion.degraded`` on ``tuneflow.model.<model name>``: the
                                          champion degraded on new data (the message says by how much and why)
    <name>: alert on review needed        ``tuneflow.review.requested`` on ``tuneflow.model.<model name>``: a
                                          challenger waits for a person (links to the run and both versions)

and one for every flow run of the server (team mode):

    tuneflow: crash unresponsive flow runs   no ``prefect.flow-run.heartbeat`` (and no final state) for
                                          CRASH_AFTER_SECONDS after a heartbeat: the run is set ``Crashed``

A worker machine that dies (power, kill -9, a lost container) cannot report its flow run's end, and Prefect's
server does not notice by itself: the run would stay Running forever. Deployed runs emit heartbeats when
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set (deployments/prefect.yaml sets 30 s, Prefect's minimum), and this
automation turns their silence into ``Crashed``, which the failed-retrain alert then posts.

The automations live on the Prefect server and run there: the server's automation service sends the
notification, so alerts keep coming when no ``tuneflow serve`` runs (team mode: create them once with
``tuneflow alerts --config ...``). The webhook URL (``alerts.webhook_url`` or the environment variable
``alerts.webhook_url_env``) is stored as a secret field of the block: the UI, logs and API show it masked.
"""

from __future__ import annotations

import logging
from typing import Any

from tuneflow.config import PipelineConfig
from tuneflow.watch import DEGRADED_EVENT, QUARANTINED_EVENT, REVIEW_EVENT, model_resource, resource_id

log = logging.getLogger(__name__)

FAILED_BODY = (
    "Retrain {{ flow_run.name }} of {model} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "Flow run: {{ (flow_run|ui_url) or ('id ' ~ flow_run.id ~ ' (no UI URL: set PREFECT_UI_URL on the server)') }}"
)
QUARANTINED_BODY = "{{ event.payload.message }}\nFlow run: {{ event.payload.flow_run_url }}"
REVIEW_BODY = (
    "{{ event.payload.message }}\nFlow run: {{ event.payload.flow_run_url or '-' }}\n"
    "Challenger: {{ event.payload.version_url }}\nChampion: {{ event.payload.champion_url or '-' }}"
)
DECAY_BODY = (
    "{{ event.payload.message }}\nMonitoring run: {{ event.payload.monitor_run_url }}\n"
    "Flow run: {{ event.payload.flow_run_url }}"
)


CRASH_AUTOMATION = "tuneflow: crash unresponsive flow runs"
# Three missed heartbeats at the 30 s of deployments/prefect.yaml (Prefect's own recipe uses 90 s too).
CRASH_AFTER_SECONDS = 90


def ensure_crash_detection(within_seconds: float = CRASH_AFTER_SECONDS) -> str:
    """Create (or replace) the automation that marks a silent flow run ``Crashed``; returns its name.

    Prefect's recipe for "zombie" flow runs: after each ``prefect.flow-run.heartbeat`` of a run, expect another
    heartbeat or a final state of that run within ``within_seconds``. Needs ``PREFECT_API_URL``.
    """
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    while True:  # replace, never duplicate
        try:
            Automation.read(name=CRASH_AUTOMATION).delete()
        except ValueError:
            break
    Automation(
        name=CRASH_AUTOMATION,
        description=f"Mark a flow run Crashed when it sent no heartbeat for {within_seconds:.0f} s (its worker died)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_seconds:.0f} s: the process running this flow run is gone "
                "(worker killed or machine lost)",
            )
        ],
    ).create()
    log.info("automation %r marks flow runs silent for %.0f s Crashed", CRASH_AUTOMATION, within_seconds)
    return CRASH_AUTOMATION


def block_name(cfg: PipelineConfig) -> str:
    return f"tuneflow-alerts-{cfg.name}".lower().replace("_", "-")


def automation_names(cfg: PipelineConfig) -> dict[str, str]:
    return {
        "failed": f"{cfg.name}: alert on failed retrain",
        "quarantined": f"{cfg.name}: alert on quarantined batch",
        "decay": f"{cfg.name}: alert on decay",
        "review": f"{cfg.name}: alert on review needed",
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
    if a.on_decay:
        wanted.append(
            alert(
                names["decay"],
                f"the champion of {model} degrades on new data",
                f"tuneflow: {model} degraded on new data",
                DECAY_BODY,
                expect={DEGRADED_EVENT},
                match={"prefect.resource.id": model_resource(model)},
            )
        )
    if a.on_review:
        wanted.append(
            alert(
                names["review"],
                f"a challenger of {model} waits for review",
                f"tuneflow: review needed for {model}",
                REVIEW_BODY,
                expect={REVIEW_EVENT},
                match={"prefect.resource.id": model_resource(model)},
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
