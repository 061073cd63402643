"""Rewrite docs/reference.md's config section from the configs (tests/test_docs.py checks it)."""

from pathlib import Path

from anatomy_nb.config import reference_markdown

path = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
text = path.read_text(encoding="utf-8")
head, rest = text.split(start)
path.write_text(head + start + reference_markdown() + end + rest.split(end)[1], encoding="utf-8")
print(f"rewrote {path}")
