"""The documentation's links and commands point at things that exist: README.md and docs/*.md (no Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import ROOT

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
STAGE_PAGES = ("sft", "dpo", "aif", "eval", "serve", "pipeline", "models", "data", "cluster", "benchmarks", "config")

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_MAKE = re.compile(r"(?:^|`)make ([A-Za-z][\w-]*)", re.M)
_TARGET = re.compile(r"^([A-Za-z][\w-]*)\s*:(?!=)", re.M)


def _prose(text: str) -> str:
    """``text`` without fenced blocks and code spans, where a ``[x](y)`` is not a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but ``-``/``_`` dropped, spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown page, repeated headings numbered ``-1``, ``-2`` as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for match in _HEADING.finditer(_FENCE.sub("", text)):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """``page``'s relative links whose file is missing, or whose ``#anchor`` names no heading of that file."""
    problems = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: {target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{page.name}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def make_targets(makefile: str) -> set[str]:
    return set(_TARGET.findall(makefile))


def test_the_docs_pages_exist():
    assert {p.stem for p in PAGES} >= {"README", *STAGE_PAGES}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_readme_links_every_docs_page():
    readme = _prose((ROOT / "README.md").read_text(encoding="utf-8"))
    linked = {t.partition("#")[0] for t in _LINK.findall(readme)}
    assert {f"docs/{name}.md" for name in STAGE_PAGES} <= linked


def test_make_targets_named_in_readme_exist():
    named = set(_MAKE.findall((ROOT / "README.md").read_text(encoding="utf-8")))
    assert {"demo", "test", "test-fast", "demo-tiny", "bench", "bench-real", "docs"} <= named
    missing = named - make_targets((ROOT / "Makefile").read_text(encoding="utf-8"))
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


def test_checkers_catch_what_they_check(tmp_path):
    """The helpers above flag a missing file, a missing anchor and an unknown target, and skip code."""
    (tmp_path / "other.md").write_text("# Other page\n\n## The `x.y` key: part 2\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md) [ok](other.md#the-xy-key-part-2) [ok](#page) [web](https://x.org/a)\n"
                    "[gone](missing.md) [bad](other.md#not-a-heading) [bad](#nowhere)\n"
                    "`[code](missing2.md)`\n\n```\n[fenced](missing3.md)\n```\n")
    assert broken_links(page) == [
        f"page.md: missing.md: no such file {tmp_path / 'missing.md'}",
        "page.md: other.md#not-a-heading: no heading #not-a-heading in other.md",
        "page.md: #nowhere: no heading #nowhere in page.md",
    ]
    assert anchors("# A\n## A\n## A\n") == {"a", "a-1", "a-2"}
    assert slug("Recipe `sft`") == "recipe-sft"
    assert make_targets("X := 1\nall: b\n.PHONY: all\nbench-real: install\n\t$(PY) x\n") == {"all", "bench-real"}
    assert _MAKE.findall("run `make demo`, then\nmake test-fast # x\nto make it work") == ["demo", "test-fast"]
