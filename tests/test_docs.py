"""The documentation's links: every relative link in README.md, docs/*.md and the other
top-level pages names a file of the repository, and an anchor names a heading of that page
(as GitHub makes its anchors), so that moving text between pages breaks no link unseen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.repo import REPO_ROOT

PAGES = sorted([REPO_ROOT / "README.md", REPO_ROOT / "RELIABILITY.md", REPO_ROOT / "BENCHMARKS.md",
                REPO_ROOT / "infra" / "prefect" / "README.md",
                *(REPO_ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(markdown: str) -> str:
    """The text outside code: fenced and indented blocks and inline code spans removed."""
    kept, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            continue
        kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped (code spans keep
    their text), spaces as hyphens, and -1, -2, ... on repeats."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file or anchor does not exist, as `target: why`."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert page.is_file(), page
    assert broken_links(page) == []


def test_readme_links_every_docs_page() -> None:
    """Each page under docs/ is reachable from README."""
    readme = (REPO_ROOT / "README.md").read_text()
    for page in (REPO_ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name}" in readme, page.name


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## `dvc repro`, on a laptop\n\n## Which Ray\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#dvc-repro-on-a-laptop) [ok](#page) "
                    "[gone](missing.md) [anchor](other.md#no-such-heading) "
                    "[web](https://example.invalid/x.md)\n\n    [code](ignored.md)\n"
                    "`[span](ignored.md)`\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#no-such-heading: no heading with that anchor in "
                                  "other.md"]
    assert anchors("# A\n## A\n## 1. B, c\n") == {"a", "a-1", "1-b-c"}
