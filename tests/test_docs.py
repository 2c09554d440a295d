"""The documentation stays true to the code: what the contract defines, the docs name."""

from pathlib import Path

from protocol import events
from server.verify import REASONS

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
