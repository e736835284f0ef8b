"""The README is the front door and docs/ the site (`make docs`): short, no dead links, no unknown make targets.

The site itself is built with ``mkdocs build --strict`` by `make docs` and by .ci/run (links between docs pages and
their anchors are checked there too); these tests need no mkdocs.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

# [text](target) outside code; an image ![..](..) is a link too
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
# `make <target>` in an inline code span or at the start of a line of a code block
MAKE_IN_SPAN = re.compile(r"`make ([a-z][\w-]*)")
MAKE_IN_BLOCK = re.compile(r"^\s*make ([a-z][\w-]*)", re.M)
MAKE_TARGET = re.compile(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)", re.M)


def _prose(text: str) -> str:
    """The markdown without fenced code blocks and inline code spans (where a `[x](y)` is no link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """Python-Markdown's default toc slug (what mkdocs uses for anchors): ASCII, lower case, hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(2)) for m in HEADING.finditer(FENCE.sub("", page.read_text(encoding="utf-8")))}


def _relative_links(page: Path) -> list[str]:
    targets = LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # skip http:, mailto:, ...


def _makefile_targets() -> set[str]:
    return set(MAKE_TARGET.findall((ROOT / "Makefile").read_text(encoding="utf-8")))


def _make_targets_named(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    named = set(MAKE_IN_SPAN.findall(text))
    for block in FENCE.findall(text):
        named |= set(MAKE_IN_BLOCK.findall(block))
    return named


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; keep it <= 200 and move detail into docs/"


def test_the_docs_pages_exist() -> None:
    assert (ROOT / "mkdocs.yml").is_file()
    assert (DOCS / "index.md").is_file()
    assert len(PAGES) >= 10, [p.name for p in PAGES]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page: Path) -> None:
    links = _relative_links(page)
    bad = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{link}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading with anchor #{anchor} in {target.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: dead links:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_site_pages_link_only_inside_the_site(page: Path) -> None:
    """mkdocs serves docs/ only: a page's relative link out of it is dead on the site (`--strict` refuses it)."""
    outside = [link for link in _relative_links(page)
               if link.partition("#")[0] and not (page.parent / link.partition("#")[0]).resolve().is_relative_to(DOCS)]
    assert not outside, f"{page.relative_to(ROOT)}: links outside docs/ (name the file in `code` instead): {outside}"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if not re.search(rf":\s*{re.escape(p.name)}\s*$", nav, re.M)]
    assert not missing, f"mkdocs.yml: nav lacks {missing}"


NAMED = sorted(set().union(*(_make_targets_named(p) for p in [README, *PAGES])))


@pytest.mark.parametrize("target", NAMED)
def test_make_targets_named_in_the_docs_exist(target: str, request: pytest.FixtureRequest) -> None:
    targets = _makefile_targets()
    if target == "docs" and target not in targets:
        # KNOWN GAP: the `docs` target is added to the Makefile separately (issue 20); until then this case xfails.
        request.applymarker(pytest.mark.xfail(reason="Makefile has no `docs` target yet", strict=True))
    assert target in targets, f"README.md / docs/ name `make {target}`, which the Makefile does not define"


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """The parsers above are not vacuous: a dead link, a missing anchor and an unknown target are found."""
    (tmp_path / "a.md").write_text("# A page\n\n## Some `code` (x)\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#some-code-x) [dead](nope.md) [anchor](a.md#missing) `[code](nope2.md)` [web](https://x.org)\n"
        "```bash\nmake demo   # a comment\n[x](nope3.md)\n```\nrun `make nosuch-target` here\n",
        encoding="utf-8",
    )
    assert _relative_links(page) == ["a.md#some-code-x", "nope.md", "a.md#missing"]
    assert _anchors(tmp_path / "a.md") == {"a-page", "some-code-x"}
    assert _make_targets_named(page) == {"demo", "nosuch-target"}
    assert {"help", "install", "demo", "test"} <= _makefile_targets()
    assert "PY" not in _makefile_targets() and "SHELL" not in _makefile_targets()
