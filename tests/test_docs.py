"""The documentation stays true to the code: what the contract defines, the docs name."""

from pathlib import Path

from battery_trace.protocol import events
from battery_trace.server.verify import REASONS

ROOT = Path(__file__).parent.parent


def test_wire_contract_names_every_type_field_role_source_and_reason():
    doc = (ROOT / "docs" / "wire-contract.md").read_text()
    for spec in events.EVENT_TYPES.values():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{spec.name}` |")), None)
        assert row is not None, f"{spec.name} has no row in the event table"
        assert ", ".join(spec.roles) in row
        for field in spec.fields:
            assert f"`{field.name}`" in row, f"{spec.name}.{field.name} is not documented"
            for choice in field.choices:
                if field.name != "to_role":
                    assert f"`{choice}`" in row
    for name in [*events.COMMON_FIELDS, *events.HEALTH_FIELDS, *events.SOURCES, *events.ROLES, *events.MATERIALS]:
        assert f"`{name}`" in doc, name
    for reason in REASONS:
        assert f"`{reason}`" in doc, reason


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme and (ROOT / script).exists()
    assert (
        "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
        or "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    )


def test_every_api_route_is_documented():
    from battery_trace.server.store import Store
    from battery_trace.server.web.app import create_app

    doc = (ROOT / "docs" / "api.md").read_text()
    app = create_app(Store.__new__(Store), "t", lambda: (True, "ok"))
    paths = [r.path for r in app.routes if getattr(r, "path", "").startswith(("/api", "/metrics", "/healthz"))]
    assert paths
    for path in paths:
        assert f"`GET {path}`" in doc, path


def test_integrator_guide_names_every_plc_and_keypad_command_and_site_kind():
    from battery_trace.agent.config import SITE_KINDS

    guide = (ROOT / "docs" / "integrator-guide.md").read_text()
    for word in ("VEHICLE <VIN>", "OUT <slot>", "IN <slot>", "DONE", "ABORT", "CONFIRM <action>", "REPLACE <new code>"):
        assert word in guide, word
    for kind in SITE_KINDS:
        assert kind.replace("_", "-") in guide or kind in guide, kind


def test_the_grafana_dashboard_queries_metrics_that_exist():
    import json
    import re

    from battery_trace.server import metrics

    dashboard = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    server_names = {m.name for m in metrics.REGISTRY.collect()} | {
        "bt_server_devices_online",
        "bt_server_devices_enrolled",
    }
    agent_names = {
        n.removesuffix("_total") for n in re.findall(r'"(bt_agent_\w+)"', (ROOT / "agent" / "metrics.py").read_text())
    }
    for name in set(re.findall(r"\b(bt_(?:server|agent)_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b", exprs)):
        assert name in server_names | agent_names, name
