"""Benchmarks rewrite only their own marked block of docs/benchmarks.md; hand-written text survives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "docs_block", Path(__file__).resolve().parents[1] / "bench" / "docs_block.py"
)
docs_block = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_block)


def test_block_is_replaced_and_surrounding_text_kept(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## A\n\nintro\n\n## B\n\nother\n")
    docs_block.write_block("a", "## A", "figures v1", doc)
    text = doc.read_text()
    assert text.index("## A") < text.index("figures v1") < text.index("intro") < text.index("## B")
    doc.write_text(doc.read_text().replace("intro", "reading of v1"))
    docs_block.write_block("a", "## A", "figures v2", doc)
    text = doc.read_text()
    assert "figures v2" in text and "figures v1" not in text
    assert "reading of v1" in text and "other" in text and text.count("<!-- a:begin -->") == 1
    docs_block.write_block("c", "## C", "new", doc)
    assert doc.read_text().rstrip().endswith("<!-- c:end -->")


def test_real_docs_have_a_block_for_every_bench_that_writes_one():
    text = docs_block.DOCS.read_text()
    for name in ("data_pipeline", "train_step", "dp_overhead", "dp_utility", "federation_overhead",
                 "federated_vs_pooled"):
        assert f"<!-- {name}:begin -->" in text and f"<!-- {name}:end -->" in text, name
