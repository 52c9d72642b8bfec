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


# The settings the code reads, and the README's table of them -------------------------------------

ENVIRONMENT_NAMES = {"environ", "env", "environment"}  # what the code calls a mapping of environment variables
SETTING_READERS = {"get", "getenv"}  # settings.py's get("X"), os.getenv("X")
TYPED_READERS = {"_number", "_flag", "_choice", "_region"}  # settings.py's readers: (env, "X", …)
VARIABLE = re.compile(r"[A-Z][A-Z0-9_]{2,}")


def variables_read(source: str) -> set[str]:
    """The environment variables a module reads: `os.environ.get("X")`, `env["X"]`, `env.setdefault("X", …)`,
    `os.getenv("X")`, and settings.py's `get("X")`, `_number(env, "X", …)` and the like."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            target, keys = node.value, [node.slice]
        elif isinstance(node, ast.Call):
            target, keys = node.func, node.args[:1]
        else:
            continue
        names = {part.attr if isinstance(part, ast.Attribute) else getattr(part, "id", None)
                 for part in (target, getattr(target, "value", None))}
        if isinstance(node, ast.Call) and names & TYPED_READERS:
            keys = node.args[1:2]
        elif isinstance(node, ast.Call) and not (names & ENVIRONMENT_NAMES or names & SETTING_READERS):
            continue
        if isinstance(node, ast.Subscript) and not names & ENVIRONMENT_NAMES:
            continue
        found |= {key.value for key in keys if isinstance(key, ast.Constant) and isinstance(key.value, str)
                  and VARIABLE.fullmatch(key.value)}
    return found


def test_the_variables_read_are_found_however_they_are_read():
    source = """
import os
os.environ.get("ONE", "DEFAULT"); os.environ["TWO"]; env.get("THREE", "x"); env.setdefault("FOUR", "1")
os.getenv("FIVE")
get("SIX"); _number(env, "SEVEN", 3, int); _flag(env, "EIGHT", True)
params.get("EventName"); headers.get("X-Request-Id"); row["NOT_ENV"]; env["WRITTEN"] = "1"
"""
    assert variables_read(source) == {"ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT"}


def readme_settings_table() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return {name for line in section.splitlines() if line.startswith("| `")
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split(" | ")[0])}


def test_the_readme_lists_every_variable_the_code_reads():
    sources = [path for path in ROOT.rglob("*.py")
               if not ({".venv", "tests", "bench", ".git"} & set(path.relative_to(ROOT).parts))]
    read = {name: sorted(str(path.relative_to(ROOT)) for path in sources if name in variables_read(path.read_text()))
            for name in set().union(*(variables_read(path.read_text()) for path in sources))}
    assert len(read) > 30 and "EMBEDDED_PGDATA" in read and "GUNICORN_BIND" in read
    missing = {name: where for name, where in read.items() if name not in readme_settings_table()}
    assert not missing, f"read by the code but not in the README's settings table: {missing}"
