"""The config reference (``docs/config.md``), generated from the typed recipe dataclasses in ``zephyr_ray/config/``.

Every recipe in ``RECIPES`` gets a table of its keys (dotted, ``[]`` for a list item) with type, default,
valid choices and the ``#`` comment written above the field in the source. A dataclass used in more than one
place (``EngineConfig``, ``SamplingParams``, ``RunConfig`` ...) is documented once in its own section and the
recipe tables link to it; a recipe nested in another (the pipeline's stage sections) links to that recipe.

    python -m zephyr_ray.config_reference                         # print the Markdown
    python -m zephyr_ray.config_reference --write [docs/config.md]  # replace the block between the markers
    python -m zephyr_ray.config_reference --check [docs/config.md]  # exit 1 when the file's block is stale

The reference lives in its own page, not the README, so the front page stays short; the file argument still
lets any Markdown file with the markers hold it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from zephyr_ray.config import RECIPES

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
# The page holding the reference (relative to the project root, where `make docs` runs).
DEFAULT_PATH = "docs/config.md"
WRITE_CMD = f"python -m zephyr_ray.config_reference --write {DEFAULT_PATH}"

# Linked sections: class -> the anchor a reference row points at instead of repeating the class's keys.
Links = dict[type, str]


# --- reading the dataclasses ------------------------------------------------------------------------------

def _class_comments(cls: type) -> dict[str, str]:
    """Field name -> the full-line ``#`` comments directly above its definition in ``cls``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line number -> comment text, for lines holding only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not tok.line[: tok.start[1]].strip():
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    out: dict[str, str] = {}
    for stmt in node.body if node else []:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            line, lines = stmt.lineno - 1, []
            while line in comments:
                lines.append(comments[line])
                line -= 1
            if lines:
                out[stmt.target.id] = " ".join(reversed(lines))
    return out


def field_comments(cls: type) -> dict[str, str]:
    """Comments of every field of ``cls``, inherited fields included (from the class that defines them)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__annotations__" in vars(klass):
            out.update(_class_comments(klass))
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # unresolvable string annotations: treat those fields as leaves
        return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}


def _nested(tp: Any) -> tuple[type, str] | None:
    """(dataclass, kind) for a field holding dataclasses: kind is "one", "list" or "optional"."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp, "one"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0], "list"
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and isinstance(rest[0], type) and dataclasses.is_dataclass(rest[0]):
            return rest[0], "optional"
    return None


def _type_name(f: dataclasses.Field, tp: Any) -> str:
    if isinstance(f.type, str):
        return f.type
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _overrides(value: Any, base: Any) -> dict[str, Any]:
    """The fields that dataclass ``value`` sets differently from ``base`` (same class), recursively."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(base):
        mine, theirs = getattr(value, f.name), getattr(base, f.name)
        if dataclasses.is_dataclass(mine) and type(mine) is type(theirs):
            sub = _overrides(mine, theirs)
            if sub:
                out[f.name] = sub
        elif mine != theirs:
            out[f.name] = dataclasses.asdict(mine) if dataclasses.is_dataclass(mine) else mine
    return out


# --- Markdown --------------------------------------------------------------------------------------------

def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _json(value: Any) -> str:
    return _code(json.dumps(value))


def _prose(text: str) -> str:
    """Comment text for a table cell: `|` escaped; `<` escaped outside code spans (not taken as HTML)."""
    parts = text.replace("|", "\\|").replace("``", "`").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts)


def _docline(cls: type) -> str:
    doc = inspect.getdoc(cls) if "__doc__" in vars(cls) and cls.__doc__ else ""
    # dataclass() writes a signature as the docstring of a class without one.
    return "" if not doc or doc.startswith(cls.__name__ + "(") else " ".join(doc.split())


def _rows(cls: type, instance: Any, prefix: str, links: Links) -> list[list[str]]:
    """Table rows (key, type, default, choices, description) for the fields of ``cls``, flattening nested
    dataclasses not in ``links``; ``instance`` supplies the defaults (a recipe may override a class's)."""
    rows: list[list[str]] = []
    hints, comments = _hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints.get(f.name, f.type)
        value = getattr(instance, f.name)
        comment = _prose(comments.get(f.name, ""))
        nested, tname = _nested(tp), _type_name(f, tp)
        if nested is None:
            choices = ", ".join(_code(c) for c in f.metadata.get("choices", ()))
            rows.append([_code(key), _code(tname), _json(value), choices, comment])
            continue
        sub, kind = nested
        if kind == "list":
            default = _json([_overrides(item, sub()) for item in value]) if isinstance(value, list) else ""
        elif value is None:
            default = _json(None)
        elif dataclasses.is_dataclass(value):
            default = _json(_overrides(value, sub())) if sub in links else ""
        else:
            default = ""
        if sub in links:
            rows.append([_code(key), f"[{_code(tname)}](#{links[sub]})", default, "", comment])
            continue
        doc = _prose(_docline(sub))
        rows.append([_code(key), _code(tname), default, "", " ".join(filter(None, [comment, doc]))])
        item = value if kind != "list" and dataclasses.is_dataclass(value) else sub()
        rows.extend(_rows(sub, item, key + ("[]." if kind == "list" else "."), links))
    return rows


def _table(rows: list[list[str]]) -> str:
    lines = ["| Key | Type | Default | Choices | Description |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_class(cls: type, title: str | None = None, links: Links | None = None, intro: str = "") -> str:
    """One ``###`` section documenting every key of dataclass ``cls`` (relative to where it is used)."""
    title = title or _code(cls.__name__)
    parts = [f"### {title}"]
    text = " ".join(filter(None, [_prose(_docline(cls)), intro]))
    if text:
        parts.append(text)
    parts.append(_table(_rows(cls, cls(), "", links or {})))
    return "\n\n".join(parts) + "\n"


def _shared(recipes: dict[str, type]) -> dict[type, list[str]]:
    """Dataclasses used at more than one place in the recipes (not descending into nested recipes), in order
    of first use, with the dotted keys that use them."""
    roots = set(recipes.values())
    sites: dict[type, list[str]] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            nested = _nested(hints.get(f.name, f.type))
            if nested is None or nested[0] in roots:
                continue
            sub, kind = nested
            key = prefix + f.name + ("[]" if kind == "list" else "")
            sites.setdefault(sub, []).append(key)
            walk(sub, key + ".")

    for name, cls in recipes.items():
        walk(cls, name + ".")
    return {cls: keys for cls, keys in sites.items() if len(keys) > 1}


def recipe_title(name: str) -> str:
    return f"Recipe `{name}`"


def render(recipes: dict[str, type] | None = None) -> str:
    """The whole reference (the text between the markers of ``docs/config.md``)."""
    if recipes is None:
        recipes = RECIPES
    shared = _shared(recipes)
    links: Links = {cls: anchor(recipe_title(name)) for name, cls in recipes.items()}
    links.update({cls: anchor(cls.__name__) for cls in shared})

    def index(items: typing.Iterable[tuple[str, str]]) -> str:
        return " · ".join(f"[{label}](#{ref})" for label, ref in items)

    out = [
        f"<!-- Generated from zephyr_ray/config/ by `{WRITE_CMD}` (`make docs`); do not edit by hand. -->\n",
        "Every key can be set in the recipe YAML or as a `key=value` override after it. Keys are dotted; `[]` "
        "is every item of a list (in YAML a list of mappings; on the command line `candidates.0.name=x`). "
        "Defaults are JSON (valid YAML); for a linked section the default lists only what differs from that "
        "section's own defaults (`{}` = none, `[{}]` = one item with its defaults). Unknown keys, wrong types "
        "and values outside Choices are rejected at load time.\n",
        "Recipes: " + index((f"`{n}`", anchor(recipe_title(n))) for n in recipes) + "\n",
        "Shared sections: " + index((f"`{c.__name__}`", anchor(c.__name__)) for c in shared) + "\n",
    ]
    for name, cls in recipes.items():
        out.append(render_class(cls, recipe_title(name), links))
    for cls, keys in shared.items():
        own = {c: v for c, v in links.items() if c is not cls}
        used = "Used by " + ", ".join(_code(k) for k in keys) + "."
        out.append(render_class(cls, _code(cls.__name__), own, intro=used))
    return "\n".join(out)


# --- the page -----------------------------------------------------------------------------------------------------

def _split(text: str) -> tuple[str, str, str]:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} ... {END} block")
    head, rest = text.split(START)
    body, tail = rest.split(END)
    return head, body, tail


def updated(text: str, reference: str | None = None) -> str:
    """``text`` (a page such as docs/config.md) with the block between the markers replaced by the current reference."""
    head, _, tail = _split(text)
    body = (reference if reference is not None else render()).strip("\n")
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zephyr_ray.config_reference", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="FILE", nargs="?", const=DEFAULT_PATH,
                      help=f"replace the config-reference block of this file (default {DEFAULT_PATH})")
    mode.add_argument("--check", metavar="FILE", nargs="?", const=DEFAULT_PATH,
                      help=f"exit 1 when this file's block is stale (default {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(render())
        return 0
    path = Path(args.write or args.check)
    text = path.read_text(encoding="utf-8")
    try:
        new = updated(text)
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path}: config reference is stale; regenerate with: {WRITE_CMD}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"{path}: config reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
