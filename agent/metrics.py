"""The agent's Prometheus metrics, rendered from its live state. Labels are bounded: per slot and per
source (both fixed by the config), per reason (a fixed set), never per battery or per event."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from battery_trace.agent.control import metric_lines

if TYPE_CHECKING:
    from battery_trace.agent.app import Agent


def render(agent: Agent) -> str:
    depth, oldest = agent.outbox.depth()
    now = time.time()
    lines: list[str] = []
    lines += metric_lines(
        "bt_agent_outbox_events", "Sealed events not yet covered by a receipt.", "gauge", [({}, depth)]
    )
    lines += metric_lines(
        "bt_agent_outbox_oldest_seconds",
        "Age of the oldest unreceipted event.",
        "gauge",
        [({}, round(now - oldest, 3) if oldest else 0.0)],
    )
    lines += metric_lines(
        "bt_agent_outbox_bytes",
        "Bytes the outbox's rows take (pages in use): what the disk budget measures.",
        "gauge",
        [({}, agent.outbox.size_bytes())],
    )
    lines += metric_lines(
        "bt_agent_outbox_file_bytes",
        "Outbox database file and write-ahead log on disk (space freed by pruning is given back in batches).",
        "gauge",
        [({}, agent.outbox.file_bytes())],
    )
    lines += metric_lines(
        "bt_agent_outbox_budget_ratio",
        "Outbox size over its disk budget: health snapshots thinned from 0.8, none sealed above 1.",
        "gauge",
        [({}, round(agent.sealer.budget_used(), 4))],
    )
    lines += metric_lines(
        "bt_agent_outbox_alarm",
        "1 when the outbox is over its disk budget or cannot be written (a full disk).",
        "gauge",
        [({}, 1 if agent.sealer.alarm else 0)],
    )
    lines += metric_lines(
        "bt_agent_alarms",
        "Alarms an operator must act on (outbox, receipts, bindings, swaps); /healthz says what each is.",
        "gauge",
        [({}, len(agent.alarms()))],
    )
    lines += metric_lines(
        "bt_agent_receipt_alarm",
        "1 when a receipt told of another chain under this device's key (a restored or cloned outbox).",
        "gauge",
        [({}, 1 if agent.uplink.alarm else 0)],
    )
    lines += metric_lines(
        "bt_agent_swap_alarm",
        "1 when a swap in the last 24 h was not sealed as a whole (abandoned, spoiled, a battery unknown).",
        "gauge",
        [({}, 1 if agent.swap_alarm else 0)],
    )
    lines += metric_lines(
        "bt_agent_workflow_total",
        "The site's workflow: swaps sealed, partial, unsealed, abandoned, resumed; PLC lines refused.",
        "counter",
        [({"what": k}, v) for k, v in sorted(getattr(agent.workflow, "counters", {}).items())],
    )
    lines += metric_lines(
        "bt_agent_outbox_held",
        "Lifecycle events held in memory because the outbox cannot be written; sealed when it can.",
        "gauge",
        [({}, len(agent.sealer.held))],
    )
    lines += metric_lines(
        "bt_agent_outbox_write_errors_total",
        "Seals the outbox's database refused, by reason (disk_full, other).",
        "counter",
        [({"reason": r}, n) for r, n in sorted(agent.sealer.write_errors.items())],
    )
    lines += metric_lines(
        "bt_agent_sealed_total", "Events sealed into the outbox.", "counter", [({}, agent.sealer.sealed)]
    )
    lines += metric_lines(
        "bt_agent_refused_total",
        "Drafts not sealed, by reason.",
        "counter",
        [({"reason": r}, n) for r, n in sorted(agent.sealer.refused.items())],
    )
    up = agent.uplink
    lines += metric_lines(
        "bt_agent_broker_connected", "1 while connected to the broker.", "gauge", [({}, 1 if up.connected else 0)]
    )
    lines += metric_lines(
        "bt_agent_uplink_total",
        "Uplink activity: published, resent, receipts, pruned, refused receipts, connects.",
        "counter",
        [({"what": k}, v) for k, v in sorted(up.counters.items())],
    )
    lines += metric_lines(
        "bt_agent_source_connected",
        "1 while a source's port or bus is open.",
        "gauge",
        [({"slot": str(s.slot), "source": s.name}, 1 if s.connected else 0) for s in agent.sources],
    )
    lines += metric_lines(
        "bt_agent_source_events_total",
        "Per source: frames, timeouts, disconnects, bad frames by reason.",
        "counter",
        [
            ({"slot": str(s.slot), "source": s.name, "what": k}, v)
            for s in agent.sources
            for k, v in sorted(s.counters.items())
        ],
    )
    lines += metric_lines(
        "bt_agent_source_decode_errors_total",
        "Per source: frames that did not decode, by reason (CAN and serial decoders' reasons).",
        "counter",
        [
            ({"slot": str(s.slot), "source": s.name, "reason": r}, n)
            for s in agent.sources
            for r, n in sorted(s.decode_errors().items())
        ],
    )
    lines += metric_lines(
        "bt_agent_source_silent_seconds",
        "Seconds since a source that should be talking (a CAN bus, a polled BMS) last gave a reading.",
        "gauge",
        [
            ({"slot": str(s.slot), "source": s.name}, round(s.silence.seconds(), 3))
            for s in agent.sources
            if s.expects_traffic
        ],
    )
    lines += metric_lines(
        "bt_agent_slot_reading_age_seconds",
        "Seconds since the battery on a slot last said anything.",
        "gauge",
        [({"slot": str(n)}, round(now - st.seen_at, 3)) for n, st in sorted(agent.view.slots.items()) if st.seen_at],
    )
    lines += metric_lines(
        "bt_agent_invalid_codes_total",
        "Battery codes read that break GB/T 34014.",
        "counter",
        [({}, agent.view.invalid_codes)],
    )
    lines += metric_lines(
        "bt_agent_bindings_total",
        "Secondary identities bound to codes, and refused rebindings.",
        "counter",
        [({"what": k}, v) for k, v in sorted(agent.bindings.counters.items())],
    )
    lines += metric_lines(
        "bt_agent_control_refused_total",
        "POST /confirm requests refused, by reason (host, origin, content_type, secret).",
        "counter",
        [({"reason": r}, n) for r, n in sorted(agent.control.refused.items())] if agent.control else [],
    )
    lines += metric_lines(
        "bt_agent_tick_errors_total",
        "Periodic ticks that failed (logged; the agent goes on).",
        "counter",
        [({}, agent.tick_errors)],
    )
    return "\n".join(lines) + "\n"
