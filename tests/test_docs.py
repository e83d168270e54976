"""The docs: the site builds with every check on, its nav and pages agree, the README stays a
short front page whose links all land."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import markdown  # MkDocs' own Markdown parser (the dev extra brings it with mkdocs)
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MKDOCS_YML = ROOT / "mkdocs.yml"
README_MAX_LINES = 200


class _Links(HTMLParser):
    """Collect the targets of a rendered page's links and images."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"a": "href", "img": "src"}.get(tag)
        self.targets += [value for name, value in attrs if name == wanted and value]


def links(path: Path) -> list[str]:
    """Return every link and image target of a Markdown file, as Markdown renders them."""
    parser = _Links()
    parser.feed(markdown.markdown(path.read_text(), extensions=["fenced_code", "tables"]))
    return parser.targets


def anchors(path: Path) -> tuple[set[str], set[str]]:
    """Return the ids of a Markdown file's headings as MkDocs makes them and as GitHub does."""
    md = markdown.Markdown(extensions=["fenced_code", "tables", "toc"])
    md.convert(path.read_text())
    tokens, headings = list(md.toc_tokens), []
    while tokens:
        token = tokens.pop()
        headings.append(token)
        tokens += token["children"]
    # GitHub: lower case, punctuation dropped (but - and _), each space a hyphen.
    github = {
        re.sub(r"[^\w\- ]", "", html.unescape(heading["name"]).lower()).replace(" ", "-")
        for heading in headings
    }
    return {heading["id"] for heading in headings}, github


def nav_pages(entries: list) -> list[str]:
    """Return the page files of an mkdocs.yml nav, sections flattened."""
    pages = []
    for entry in entries:
        target = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(target) if isinstance(target, list) else [target]
    return pages


def test_site_builds_with_every_warning_an_error(tmp_path: Path) -> None:
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"]
    result = subprocess.run(
        [*build, "--config-file", str(MKDOCS_YML), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about MkDocs 2
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in nav_pages(yaml.safe_load(MKDOCS_YML.read_text())["nav"]):
        built = "index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html"
        assert (tmp_path / "site" / built).is_file(), page


def test_nav_lists_every_page_and_only_pages_that_exist() -> None:
    nav = nav_pages(yaml.safe_load(MKDOCS_YML.read_text())["nav"])
    assert len(nav) == len(set(nav)), nav
    assert sorted(nav) == sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def test_readme_is_a_short_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize(
    "target", sorted({t for t in links(README) if not urlsplit(t).scheme}), ids=str
)
def test_readme_link_lands(target: str) -> None:
    url = urlsplit(target)
    path = (README.parent / unquote(url.path)).resolve() if url.path else README
    assert path.is_file(), f"{target}: no file {path}"
    if url.fragment:
        mkdocs_ids, github_ids = anchors(path)
        assert url.fragment in github_ids, f"{target}: no such heading on GitHub"
        assert url.fragment in mkdocs_ids, f"{target}: no such heading on the site"
