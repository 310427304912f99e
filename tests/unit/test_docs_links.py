"""README.md and docs/**/*.md name only files that exist in the repository.

Checked: relative markdown links (``[text](docs/x.md)``, resolved from the document's folder, fragment dropped)
and inline code that looks like a repository path (```cloud_server/batcher.py```: its first part is a top-level
folder of the repository, or it starts with ``./`` or ``../``), resolved from the repository root (or, for
``./`` and ``../``, from the document's folder). Fenced code blocks are commands and output, not references,
and are skipped; so are URLs, anchors, generated folders (``runs/``) and placeholders (``<NAME>``, ``*``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GENERATED = {"runs", ".venv", "build", "dist"}  # written by commands, never committed
TOP_LEVEL = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} - GENERATED
TOP_LEVEL -= {p.name for p in ROOT.glob("*.egg-info")}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")  # [text](target "title") and ![image](target)
CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"(?:\.{1,2}/)?[\w.-]+(?:/[\w.-]+)*/?")


def _prose(doc: Path) -> str:
    return FENCE.sub("", doc.read_text())


def _inside(path: Path) -> bool:
    return path == ROOT or ROOT in path.parents


def _link_targets(doc: Path) -> list[str]:
    out = []
    for m in LINK.finditer(CODE.sub("", _prose(doc))):  # `exits[b](h)` in inline code is no link
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor in the same document
        out.append(target.split("#", 1)[0])
    return out


def _code_paths(doc: Path) -> list[str]:
    out = []
    for m in CODE.finditer(_prose(doc)):
        text = m.group(1).strip()
        if not PATH.fullmatch(text) or "/" not in text:
            continue
        first = text.split("/", 1)[0]
        if first in (".", "..") or first in TOP_LEVEL:
            out.append(text)
    return out


def _missing(doc: Path) -> list[str]:
    problems = []
    for target in _link_targets(doc):
        path = (doc.parent / target).resolve()
        if not _inside(path):
            problems.append(f"link ({target}) points outside the repository")
        elif not path.exists():
            problems.append(f"link ({target}): no such file")
    for text in _code_paths(doc):
        base = doc.parent if text.startswith(("./", "../")) else ROOT
        path = (base / text).resolve()
        if not _inside(path):
            problems.append(f"`{text}` points outside the repository")
        elif not path.exists():
            problems.append(f"`{text}`: no such file")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_docs_reference_only_files_in_the_repository(doc):
    problems = _missing(doc)
    assert not problems, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_the_checker_catches_a_missing_file_a_link_outside_and_ignores_code_blocks(tmp_path, monkeypatch):
    doc = ROOT / "docs" / "_link_check_probe.md"  # never written: the checker reads it through _prose
    text = ("See [the server](cloud-server.md), [gone](missing.md#part), [away](../../elsewhere/x.md),\n"
            "[web](https://example.com), [here](#top), `cloud_server/batcher.py`, `cloud_server/nope.py`,\n"
            "`runs/bundle/plan.json`, `a/b`, `exits[b](h)` and `../../shared/notes.md`.\n"
            "```\ncat cloud_server/also_missing.py [x](nowhere.md)\n```\n")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == doc else _read(self, *a, **k))
    problems = _missing(doc)
    assert problems == ["link (missing.md): no such file",
                        "link (../../elsewhere/x.md) points outside the repository",
                        "`cloud_server/nope.py`: no such file",
                        "`../../shared/notes.md` points outside the repository"]


_read = Path.read_text
