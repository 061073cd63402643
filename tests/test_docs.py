"""The docs stay true to the code: the config reference is the configs' own description, and every
relative link in the README and docs/ points at a file that exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_config_reference_is_generated_from_the_configs():
    from anatomy_nb.config import reference_markdown

    text = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    section = text.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert section == reference_markdown(), (
        "docs/reference.md is stale: paste anatomy_nb.config.reference_markdown() between its markers"
    )


def test_every_relative_link_resolves():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} → {target}")
    assert not broken, broken


def test_the_docs_cover_the_four_kinds_and_the_readme_links_them():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in ("tutorial", "how-to", "reference", "explanation"):
        assert (REPO / "docs" / f"{page}.md").exists() and f"docs/{page}.md" in readme
    assert len(readme.splitlines()) < 250  # quick start and contract; the measurements live in docs/explanation.md
