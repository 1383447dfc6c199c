"""The mutation table stays current (every original applies exactly once, every named test exists),
and the checker classifies outcomes correctly on a throwaway repository."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(_spec)
sys.modules["mutation_check"] = mutation_check  # dataclasses look their module up by name
_spec.loader.exec_module(mutation_check)


def test_the_shipped_table_applies_to_the_current_code():
    mutations = mutation_check.load_table()
    assert mutation_check.table_problems(mutations) == []
    areas = {m.area for m in mutations}
    assert {"sequence", "attention", "rope", "decoder", "kv-cache", "loop", "objectives", "losses", "scorer",
            "metrics", "interop"} <= areas


def _mutation(**fields):
    base = dict(id="m", area="a", file="pkg/code.py", original="return a + b", replacement="return a - b",
                description="d", tests=("tests/test_code.py::test_add",))
    return mutation_check.Mutation(**{**base, **fields})


def test_table_problems_name_stale_originals_missing_tests_and_duplicates(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_code.py").write_text("def test_add():\n    pass\n")
    good = _mutation()
    problems = mutation_check.table_problems([good, good, _mutation(id="s", original="return a * b"),
                                              _mutation(id="x", tests=("tests/test_code.py::test_sub",)),
                                              _mutation(id="y", file="pkg/none.py")], root=tmp_path)
    text = "\n".join(problems)
    assert "fewer than" in text and "s: the original text occurs 0 times" in text and "m: duplicate id" in text
    assert "defines no test test_sub" in text and "pkg/none.py does not exist" in text
    assert not [p for p in problems if p.startswith("m:") and "duplicate" not in p]


def test_load_table_names_the_bad_entry(tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text("- id: a\n  area: x\n  file: f.py\n  original: o\n  replacement: r\n  description: d\n"
                     "  tests: []\n")
    with pytest.raises(mutation_check.TableError, match=r"entry 0 \(a\).*tests"):
        mutation_check.load_table(table)


@pytest.mark.parametrize("replacement, status", [("return a - b", "caught"), ("return b + a", "survived")])
def test_a_planted_bug_is_caught_or_survives_and_the_file_is_restored(tmp_path, replacement, status):
    (tmp_path / "pkg").mkdir()
    source = "def add(a, b):\n    return a + b\n"
    (tmp_path / "pkg" / "code.py").write_text(source)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_code.py").write_text(
        "from pkg.code import add\n\ndef test_add():\n    assert add(2, 1) == 3\n")
    outcome = mutation_check.run_mutation(tmp_path, _mutation(replacement=replacement), timeout=60)
    assert outcome.status == status
    assert (tmp_path / "pkg" / "code.py").read_text() == source


def test_docs_list_every_mutation():
    listed = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    missing = [m.id for m in mutation_check.load_table() if f"`{m.id}`" not in listed]
    assert not missing, f"docs/testing.md does not list {missing}: regenerate its table"
