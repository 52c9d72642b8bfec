"""The documents cite tests by name (`tests/file.py::test`, then `::test` for more of the same file):
every one cited must exist, or a renamed test leaves a defence that only looks proven."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?|`::(\w+)`")


def defined_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef)}


def citations(text: str) -> list[tuple[str, str | None]]:
    """(file, name or None) for each citation; a bare `::name` belongs to the file cited last."""
    found, last = [], None
    for match in CITATION.finditer(text):
        if match.group(1):
            last = match.group(1)
            found.append((last, match.group(2)))
        elif last:
            found.append((last, match.group(3)))
    return found


def test_citations_are_read_as_written():
    text = "`tests/a.py::one`, `::two`; `tests/drills/b.py`; `::three`"
    assert citations(text) == [("tests/a.py", "one"), ("tests/a.py", "two"), ("tests/drills/b.py", None),
                               ("tests/drills/b.py", "three")]


def test_every_test_the_documents_cite_exists():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cited = [(doc.name, file, name) for doc in documents for file, name in citations(doc.read_text())]
    assert len(cited) > 100  # docs/security.md alone cites more than that
    missing = []
    for doc, file, name in cited:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{doc}: {file}")
        elif name and name not in defined_in(path):
            missing.append(f"{doc}: {file}::{name}")
    assert not missing, "cited but not there:\n" + "\n".join(missing)
