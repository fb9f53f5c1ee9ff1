"""Crashed runs: a served flow run whose process dies (SIGKILL, the OOM killer, a lost host) is marked
Crashed by the Prefect server instead of staying Running forever.

Prefect 3.9's flow engine emits a `prefect.flow-run.heartbeat` event from a thread of the process that
runs the flow, every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect's default: 180, its minimum:
30), until the run reaches a final state. A process that dies stops sending them. The automation made
here (`ensure_crash_automation`) is Prefect's "zombie flow" recipe: a proactive trigger that, for each
flow run that sent a heartbeat, fires when neither another heartbeat nor a final state
(Completed/Failed/Cancelled/Crashed) follows within `window_s`, and sets that run Crashed. The server's
triggers service evaluates proactive triggers every 5 s (PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY),
so a dead run is Crashed at most about window_s + 5 s after its process died.

The automation lives on the server and would judge every flow run reporting there: a run heartbeating
at Prefect's default 180 s would be Crashed, alive, by a 90 s window. So it only judges runs tagged
WATCH_TAG, which `deployments/serve.py` puts on the deployments it serves, whose runs it also makes
heartbeat every `heartbeat_s` (the tag travels into the runs and their events).

The CLI does the same against a real server (PREFECT_API_URL set): it tags its runs WATCH_TAG and sets
PREFECT_FLOWS_HEARTBEAT_FREQUENCY to `serve.heartbeat_s`, so a foreground run killed with -9 is Crashed
by the same automation, once a serve process has installed it on that server. Without PREFECT_API_URL
the CLI talks to a temporary server of its own, which dies with it. SIGTERM or Ctrl-C is different
anyway: Prefect's engine catches it and reports the run Crashed itself.

`refinery serve` calls `ensure_crash_automation` at start (idempotent: created once, then updated in
place when the window changes) and serves with `serve.heartbeat_s` (default 30, at least 30); the window
is `serve.crash_after_s` (default 3 heartbeats, at least 2, so one late heartbeat does not crash a run).

A rerun of a Crashed run resumes from what is done, as after any kill: finished tasks are Cached.
"""
from __future__ import annotations

from datetime import timedelta
from uuid import UUID

AUTOMATION = "refinery: crashed runs"
WATCH_TAG = "refinery-heartbeat"
FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def crash_settings(serve) -> tuple[int, int]:
    """(heartbeat_s, window_s) of a ServeConfig (validated there: heartbeat >= 30, window >= 2 beats)."""
    return serve.heartbeat_s, serve.crash_after_s or 3 * serve.heartbeat_s


def crash_automation(window_s: int, tag: str = WATCH_TAG):
    """The automation (not yet on any server): a run tagged `tag` silent for `window_s` -> Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=AUTOMATION,
        description=(f"A flow run tagged '{tag}' that sent a heartbeat and then neither another one nor a "
                     f"final state within {window_s} s lost its process (SIGKILL, OOM, a lost host): "
                     "mark it Crashed. Installed by `refinery serve` (flows/crash.py)."),
        enabled=True,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL)},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=window_s),
        ),
        # not forced: a run that reached a final state meanwhile keeps it
        actions=[ChangeFlowRunState(state=StateType.CRASHED, name="Crashed",
                                    message=f"No heartbeat for {window_s} s: the process running this flow "
                                            "run died (killed, out of memory, or its host was lost).")],
    )


def _same(a, b) -> bool:
    def norm(x):
        d = x.model_dump(mode="json", include={"name", "description", "enabled", "trigger", "actions"})
        d["trigger"].pop("id", None)
        for key in ("after", "expect", "for_each"):       # sets: their order is not meaningful
            d["trigger"][key] = sorted(d["trigger"][key])
        return d
    return norm(a) == norm(b)


def ensure_crash_automation(window_s: int, tag: str = WATCH_TAG) -> tuple[UUID, str]:
    """Create the crash automation on the current API, or bring the existing one (by name) up to date.
    Returns (its id, "created" | "updated" | "unchanged"). Copies with the same name (two serve
    processes starting at once) are removed, so a run is never Crashed twice."""
    from prefect.client.orchestration import get_client

    want = crash_automation(window_s, tag)
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(AUTOMATION)
        if not found:
            return client.create_automation(want), "created"
        # keep one already as wanted if there is one, else any: the same one whoever decides
        found.sort(key=lambda a: (not _same(a, want), str(a.id)))
        keep, extra = found[0], found[1:]
        for a in extra:
            client.delete_automation(a.id)
        if _same(keep, want):
            return keep.id, "unchanged"
        client.update_automation(keep.id, want)
        return keep.id, "updated"
