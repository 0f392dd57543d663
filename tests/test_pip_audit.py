"""pip-audit of the installed dependencies (issue #15; bench/audit_deps.py): no known
vulnerability. Skips when pip-audit is missing or the vulnerability data is out of reach."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_no_known_vulnerabilities() -> None:
    spec = importlib.util.spec_from_file_location("audit_deps", REPO / "bench" / "audit_deps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.audit()
    if result["status"] == "unavailable":
        pytest.skip(f"pip-audit could not audit here (offline?): {result.get('reason')}")
    assert result["status"] == "clean", result["findings"]
    assert result["audited"] > 0
