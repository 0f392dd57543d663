"""pip-audit of the installed dependencies (issue #15): clean, or each finding listed.

    python bench/audit_deps.py [--json out.json]

Exit 0 when no known vulnerability is found, 1 when some are (each printed with its fix
version), 2 when nothing could be audited (no access to the PyPI/OSV vulnerability data, as on
an offline machine): that is "not audited", never "clean".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def audit() -> dict[str, Any]:
    """Run pip-audit on this interpreter's environment; a summary of its JSON report."""
    exe = shutil.which("pip-audit") or str(Path(sys.executable).with_name("pip-audit"))
    if not Path(exe).exists():
        return {"status": "unavailable", "reason": "pip-audit is not installed (dev extra)"}
    run = subprocess.run(
        [exe, "--format", "json", "--progress-spinner", "off", "--local"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        return {"status": "unavailable", "reason": run.stderr.strip()[-500:]}
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if "skip_reason" in d]
    findings = [
        {
            "name": d["name"],
            "version": d.get("version"),
            "id": v["id"],
            "fix": v.get("fix_versions"),
        }
        for d in deps
        for v in d.get("vulns", [])
    ]
    audited = len(deps) - len(skipped)
    status = "unavailable" if deps and audited == 0 else ("clean" if not findings else "findings")
    return {
        "status": status,
        "dependencies": len(deps),
        "audited": audited,
        "skipped": len(skipped),
        "findings": findings,
        "reason": skipped[0]["skip_reason"] if status == "unavailable" and skipped else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = audit()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return {"clean": 0, "findings": 1}.get(result["status"], 2)


if __name__ == "__main__":
    sys.exit(main())
