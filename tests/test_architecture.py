"""DESIGN.md §2: imports flow one way. medseg_core never imports flwr/opacus or an app package; server and
client never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "medseg_core": {"flwr", "opacus", "server", "client", "pretrain"},
    "server": {"client"},
    "client": {"server"},
    "pretrain": {"server", "client"},
}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no Python files"
    bad = {
        str(f.relative_to(ROOT)): sorted(_imported_top_modules(f) & FORBIDDEN[package])
        for f in files
        if _imported_top_modules(f) & FORBIDDEN[package]
    }
    assert not bad, f"forbidden imports: {bad}"


def test_checker_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import flwr.app\nfrom opacus import PrivacyEngine\nfrom . import x\n")
    assert _imported_top_modules(f) == {"flwr", "opacus"}
