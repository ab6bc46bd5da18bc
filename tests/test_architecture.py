"""The import contract (pyproject.toml [tool.importlinter]) holds, and it catches an upward import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ["cli", "sandbox", "flows", "tasks", "checks", "deployments", "drplan"]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_the_layers_and_runbook_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_ground_module_importing_flows_breaks_the_contract_naming_the_line(tmp_path: Path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    timeutil = tmp_path / "drplan" / "timeutil.py"
    lines = timeutil.read_text().splitlines()
    timeutil.write_text("\n".join([*lines, "from flows.shared import report  # an upward import"]) + "\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout
    assert "drplan is not allowed to import flows" in result.stdout
    assert f"drplan.timeutil -> flows.shared.report (l.{len(lines) + 1})" in result.stdout
