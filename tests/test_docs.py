"""The docs hold together: the README links the index, the index links every page, and every relative link or image
in README.md and docs/ points at a file that exists (a renamed page or a deleted figure fails here, not on a reader)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown links and images, also when the text before spans lines


def _links(page: Path) -> list[str]:
    return [t.split("#")[0] for t in LINK.findall(page.read_text()) if "://" not in t and not t.startswith("#")]


def test_readme_links_the_index_and_the_index_every_page():
    assert "docs/index.md" in _links(REPO / "README.md")
    indexed = set(_links(DOCS / "index.md"))
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages and pages <= indexed, f"not in docs/index.md: {sorted(pages - indexed)}"


def test_every_relative_link_and_image_exists():
    broken = [
        f"{page.relative_to(REPO)} -> {target}"
        for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
        for target in _links(page)
        if target and not (page.parent / target).exists()
    ]
    assert not broken, broken
