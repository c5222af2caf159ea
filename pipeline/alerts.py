"""Alerts through Prefect: a notification when a pipeline run fails, and when a model misses its gate.

`mnist alerts --webhook URL` saves a webhook notification block (ALERTS_BLOCK) and two automations on the
Prefect server the stages report to. The server's own services evaluate the automations and send the
notifications, so an alert goes out whoever ran the pipeline (`mnist run`, a bare `dvc repro`, a scheduled
`mnist serve`, a fan-out worker). The webhook receives JSON: {"subject": ..., "body": ...}.

- RUN_FAILED: a flow run of PIPELINE_FLOWS that ends Failed or Crashed: a `pipeline-run` (one per
  pipeline run: `mnist run`, a `dvc repro`, a DVC experiment) whose stage failed, or was killed under
  `mnist run`; or a `pipeline` run (`mnist flow`, a scheduled run of `mnist serve`) with a failed stage.
- GATE_MISSED: the event GATE_EVENT, which the evaluate stage emits for a model under its gate.
"""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

ALERTS_BLOCK = "mnist-alerts"
RUN_FAILED = "mnist-alert-run-failed"
GATE_MISSED = "mnist-alert-gate-missed"
GATE_EVENT = "mnist.model.gate-missed"
# pipeline/stage.py's pipeline_run and pipeline/cli.py's run flow; pipeline/dag.py's end-to-end flow
PIPELINE_FLOWS = ["pipeline-run", "pipeline"]
RUN_FAILED_BODY = (
    "Flow run {{ flow_run.name }} of flow {{ flow.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}"
)
GATE_MISSED_BODY = (
    "Model {{ event.resource['prefect.resource.name'] }}: test accuracy {{ event.payload.accuracy }} is under "
    "its gate {{ event.payload.gate }} (run {{ event.payload.run }}); it is not exported."
)


def configure(url: str) -> UUID:
    """Send alerts to the webhook `url`: save ALERTS_BLOCK and (re)create both automations on the current
    Prefect server; the block's id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(name=ALERTS_BLOCK, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"})
    block_id = cast("UUID", block.save(ALERTS_BLOCK, overwrite=True))  # called from sync code: the id, not a coroutine
    remove_automations()
    for automation in automations(block_id):
        automation.create()
    return block_id


def automations(block_id: UUID) -> list[Any]:
    """RUN_FAILED and GATE_MISSED, sending to the notification block `block_id`."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    def reactive(expect: set[str], **match: Any) -> EventTrigger:
        return EventTrigger(expect=expect, posture=Posture.Reactive, threshold=1, **match)

    failed = reactive(
        {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": PIPELINE_FLOWS},
    )
    return [
        Automation(
            name=RUN_FAILED,
            description="Alerts when a pipeline run fails (mnist alerts).",
            trigger=failed,
            actions=[SendNotification(block_document_id=block_id, subject="MNIST pipeline: a run failed", body=RUN_FAILED_BODY)],
        ),
        Automation(
            name=GATE_MISSED,
            description="Alerts when a model's test accuracy is under its gate (mnist alerts).",
            trigger=reactive({GATE_EVENT}, match={"prefect.resource.id": "mnist.model.*"}),
            actions=[
                SendNotification(
                    block_document_id=block_id, subject="MNIST pipeline: a model missed its gate", body=GATE_MISSED_BODY
                )
            ],
        ),
    ]


def remove_automations() -> list[str]:
    """Delete the alert automations from the current Prefect server; the names of those that were there."""
    from prefect.automations import Automation

    removed = []
    for name in (RUN_FAILED, GATE_MISSED):
        try:
            Automation.read(name=name).delete()  # type: ignore[attr-defined]  # called from sync code: an Automation, not a coroutine
        except ValueError:  # not there
            continue
        removed.append(name)
    return removed


def gate_missed(model: str, accuracy: float, gate: float, run: str) -> None:
    """Emit GATE_EVENT for `model` of pipeline run `run`, and wait until it is sent (a stage process ends soon after)."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(
        event=GATE_EVENT,
        resource={"prefect.resource.id": f"mnist.model.{model}", "prefect.resource.name": model},
        payload={"accuracy": round(accuracy, 4), "gate": gate, "run": run},
    )
    EventsWorker.drain_all(timeout=30, at_exit=False)
