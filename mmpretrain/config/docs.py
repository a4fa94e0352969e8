"""Every config key with its type, default and docstring, read from the schema's source (the string
after each field, as torchtitan documents its config): one source for `train --help` and the docs.

No torch import: `mmpretrain train --help` stays instant.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from functools import cache
from typing import Literal, NamedTuple, get_origin

from mmpretrain.config import schema


class KeyDoc(NamedTuple):
    key: str  # dotted: "data.train_shards"
    type: str  # the annotation as written: "list[str]"
    default: object
    doc: str  # the field's docstring, one paragraph


@cache
def _docstrings() -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} of every dataclass in the schema module."""
    tree = ast.parse(inspect.getsource(schema))
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields, body = {}, node.body
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[stmt.target.id] = " ".join(after.value.value.split())
        out[node.name] = fields
    return out


def key_docs(cls: type = schema.Config, prefix: str = "") -> list[KeyDoc]:
    """Leaf keys of `cls` in declaration order; nested sections (data.masking.*) are walked."""
    docs = _docstrings().get(cls.__name__, {})
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            out += key_docs(type(default), f"{key}.")
        else:
            out.append(KeyDoc(key, _spell_choices(str(f.type)), default, docs.get(f.name, "")))
    return out


def _spell_choices(annotation: str) -> str:
    """"PairObjective | None" -> "nsp|sop | None": the allowed values, not the alias's name."""
    for name, alias in vars(schema).items():
        if get_origin(alias) is Literal:
            annotation = re.sub(rf"\b{name}\b", "|".join(schema.choices(alias)), annotation)
    return annotation


def format_key_docs(width: int = 100) -> str:
    """The config keys as a help text, grouped by section."""
    lines, section = [], None
    for doc in key_docs():
        top = doc.key.split(".", 1)[0]
        if top != section:
            section = top
            lines.append(f"\n{section}:")
        lines.append(f"  {doc.key} ({doc.type}, default {_show(doc.default)})")
        lines += textwrap.wrap(doc.doc, width, initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False)
    return "\n".join(lines).lstrip("\n")


def _show(value: object) -> str:
    """YAML-ish, as the value would be written in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return "[]" if value == [] else "{}" if value == {} else str(value)
