"""docs/config.md's config reference is generated from zephyr_ray/config/ and must stay in sync with it."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field

import pytest

from zephyr_ray import config_reference as ref
from zephyr_ray.config import RECIPES, DataConfig, choice
from zephyr_ray.config_reference import DEFAULT_PATH, WRITE_CMD, main, render, render_class, updated

from .conftest import ROOT


@pytest.fixture(scope="module")
def text() -> str:
    return render()


def _sections(text: str) -> dict[str, dict[str, list[str]]]:
    """anchor -> {key: [type, default, choices, description]} parsed from the rendered tables."""
    out: dict[str, dict[str, list[str]]] = {}
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("### "):
            rows = out.setdefault(ref.anchor(line[4:]), {})
        elif line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells[1:]
    return out


def _leaves(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a recipe, walked independently of the renderer (lists of dataclasses as `[]`)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            keys += _leaves(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(args[0]):
            keys += _leaves(args[0], f"{prefix}{f.name}[].")
        elif len(args) == 1 and dataclasses.is_dataclass(args[0]):  # X | None
            keys += _leaves(args[0], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _row(sections: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    """The row documenting ``key`` of ``section``, following links to shared sections / nested recipes."""
    rows = sections[section]
    if key in rows and "](#" not in rows[key][0]:
        return rows[key]
    for prefix in sorted(rows, key=len, reverse=True):
        link = re.search(r"\]\(#([\w-]+)\)", rows[prefix][0])
        for sep in (".", "[]."):  # a linked list of dataclasses documents one item
            if link and key.startswith(prefix + sep):
                return _row(sections, link.group(1), key[len(prefix + sep):])
    raise AssertionError(f"{key} is not documented in section #{section}")


def test_docs_config_in_sync():
    page = (ROOT / DEFAULT_PATH).read_text(encoding="utf-8")
    assert updated(page) == page, f"{DEFAULT_PATH}'s config reference is stale; regenerate with: {WRITE_CMD}"


def test_readme_holds_no_reference():
    """The reference moved to docs/config.md: a second copy in README.md would go stale unchecked."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ref.START not in readme and ref.END not in readme
    assert "(docs/config.md)" in readme


def test_every_leaf_key_of_every_recipe_is_documented(text):
    sections = _sections(text)
    for name, cls in RECIPES.items():
        section = ref.anchor(ref.recipe_title(name))
        assert section in sections, f"no section for recipe {name}"
        leaves = _leaves(cls)
        assert leaves
        for key in leaves:
            _row(sections, section, key)


def test_field_comments_types_defaults_and_choices(text):
    sections = _sections(text)
    sft = ref.anchor(ref.recipe_title("sft"))
    typ, default, choices, doc = _row(sections, sft, "data.pack_window")
    assert (typ, default) == ("`int`", "`512`")
    assert doc == "Sequences packed together per Ray Data batch (best-fit decreasing within the window)."
    # A comment spanning two lines is joined; a choice field lists every valid value.
    typ, default, choices, doc = _row(sections, ref.anchor(ref.recipe_title("dpo")), "dpo.ref.mode")
    assert doc.startswith("precompute: Ray actors") and doc.endswith("(for data made on the fly).")
    assert choices == "`precompute`, `online`"
    _, _, choices, _ = _row(sections, sft, "data.format")
    assert choices == ", ".join(f"`{c}`" for c in DataConfig.__dataclass_fields__["format"].metadata["choices"])
    # A per-recipe default that differs from the shared section's own is shown where it is used.
    assert _row(sections, ref.anchor(ref.recipe_title("aif")), "judges[].engine.name")[1] == '`"tiny"`'
    assert sections[ref.anchor(ref.recipe_title("aif"))]["judges[].engine"][1] == '`{"name": "judge"}`'


def test_shared_sections_documented_once(text):
    assert text.count("### `EngineConfig`") == 1
    assert text.count("| `max_prompt_length` | `int` | `2048` |") == 1
    sections = _sections(text)
    assert "(#engineconfig)" in sections["recipe-serve"]["engine"][0]
    if "pipeline" in RECIPES:  # a recipe nested in another links to that recipe's section
        assert "(#recipe-sft)" in sections["recipe-pipeline"]["sft"][0]


@dataclass
class Tiny:
    """A tiny config."""

    # How many.
    count: int = 1
    mode: str = choice("a", "b")


@dataclass
class TinyMore(Tiny):
    # The note, over
    # two lines (a "#" in the string below is no comment).
    note: str = "# not a comment"
    items: list[Tiny] = field(default_factory=lambda: [Tiny(count=2)])


def test_render_class_follows_the_dataclass():
    before, after = render_class(Tiny), render_class(TinyMore)
    assert "| `count` | `int` | `1` |  | How many. |" in before
    assert "| `mode` | `str` | `\"a\"` | `a`, `b` |  |" in before
    assert "note" not in before and after != before
    assert '| `note` | `str` | `"# not a comment"` |  | The note, over two lines (a "#" in the string below ' \
           'is no comment). |' in after
    assert '| `items` | `list[Tiny]` | `[{"count": 2}]` |' in after
    assert "| `items[].mode` | `str` |" in after


def test_check_and_write(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- config-reference:start -->\nSTALE-TEXT\n<!-- config-reference:end -->\n\n## After\n")
    assert main(["--check", str(readme)]) == 1
    assert WRITE_CMD in capsys.readouterr().err
    assert main(["--write", str(readme)]) == 0
    assert main(["--check", str(readme)]) == 0
    new = readme.read_text()
    assert new.startswith("# x\n\n<!-- config-reference:start -->\n") and new.endswith("-->\n\n## After\n")
    assert "STALE-TEXT" not in new and "### `EngineConfig`" in new


def test_write_and_check_default_to_docs_config(tmp_path, monkeypatch, capsys):
    assert DEFAULT_PATH == "docs/config.md" and WRITE_CMD.endswith("--write docs/config.md")
    page = tmp_path / "docs" / "config.md"
    page.parent.mkdir()
    page.write_text("# Config\n\n<!-- config-reference:start -->\nOLD\n<!-- config-reference:end -->\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--check"]) == 1
    assert "docs/config.md: config reference is stale" in capsys.readouterr().err
    assert main(["--write"]) == 0
    assert main(["--check"]) == 0
    text = page.read_text()
    assert "OLD" not in text and "### Recipe `sft`" in text and f"`{WRITE_CMD}`" in text
