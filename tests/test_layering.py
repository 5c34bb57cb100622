"""The house's layering (DESIGN.md), checked on the imports of every module so a new backbone cannot
copy a wrong pattern: models never import rl/, rl/ never imports models/, model files never import
distributed code."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "titan_flow"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(files, forbidden: str) -> list[str]:
    return [
        f"{path.name} imports {name}" if not path.is_relative_to(PACKAGE) else
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def test_models_do_not_import_rl():
    assert violations(sorted((PACKAGE / "models").rglob("*.py")), "titan_flow.rl") == []


def test_rl_does_not_import_models():
    assert violations(sorted((PACKAGE / "rl").rglob("*.py")), "titan_flow.models") == []


def test_model_files_do_not_import_distributed_code():
    model_files = sorted((PACKAGE / "models").rglob("model.py"))
    assert model_files, "no model.py found: the layout changed"
    for forbidden in ("titan_flow.distributed", "torch.distributed"):
        assert violations(model_files, forbidden) == []


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from titan_flow.rl.sde import sde_step\nimport titan_flow.models.sd3\nimport titan_flow.rlx\n")
    assert violations([bad], "titan_flow.rl") == [
        "bad.py imports titan_flow.rl.sde", "bad.py imports titan_flow.rl.sde.sde_step"
    ]
    assert violations([bad], "titan_flow.models") == ["bad.py imports titan_flow.models.sd3"]
