"""The docs stay navigable: every relative link in README.md and docs/*.md reaches a file that exists (and a
heading that exists, for `page.md#anchor`), and docs/index.md links every page of docs/.

A link checker of our own instead of a site generator: the pages are read on GitHub or in an editor, and
they link source files outside docs/ (llm/cli.py, benchmarks/NOTES.md), which mkdocs --strict rejects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code marks and punctuation dropped, spaces -> '-'."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return h.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", page.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link of a page that is not a URL."""
    out = []
    for n, line in enumerate(prose(page.read_text()).split("\n"), 1):
        for m in LINK.finditer(line):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked (offline)
                out.append((n, target))
    return out


def broken_links(page: Path) -> list[str]:
    """One line per link of `page` whose file or heading does not exist."""
    broken = []
    for n, target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.name}:{n}: link to {target}: no such file ({dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.name}:{n}: link to {target}: {dest.name} has no heading #{anchor}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_link_reaches_a_file_and_heading_that_exist(page):
    broken = broken_links(page)
    assert not broken, "\n".join(broken)


def test_the_index_links_every_page_and_the_readme_links_the_index():
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p != index and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link {missing}"
    assert "docs/index.md" in {t.partition("#")[0] for _, t in links(ROOT / "README.md")}


def test_the_checker_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# B\n")
    (tmp_path / "a.md").write_text("# Top `x`: y\n\n[ok](#top-x-y) [ok](b.md#b) [gone](c.md) [bad](b.md#nowhere)\n"
                                   "```bash\n[not a link](c.md)\n```\n`[not a link](c.md)` [web](https://x.org/c.md)\n")
    assert [line.split(": link to ")[1].split(":")[0] for line in broken_links(tmp_path / "a.md")] == [
        "c.md", "b.md#nowhere"]
