"""Class labels of manifest rows: integers as they are, or class names mapped to indices.

A label column is read one way for the whole manifest, decided by one pass over that column alone
before anything is written: if every label is an integer (3, "3", 3.0) the column holds indices;
if any is a name it holds class names, numbered by their sorted order (stable whatever the row order,
worker count or shard size) or by the lines of `--classnames FILE`. The names go into dataset.json
as "classes", as the class-folder source's do. A label that does not fit is a recorded failure of its
row, never a crash: a name not in the --classnames file (`unknown_label`), an integer among names
(`mixed_labels`), a fraction (`invalid_label`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmpretrain.errors import UserError

INTEGER, NAME, INVALID = "integer", "name", "invalid"
# Distinct names the pass over a label column may hold: 1e6 names took 105 MB (measured, CSV). A
# column with more is free text (a caption, a URL), and 1e8 rows of it would not fit in memory.
MAX_CLASSES = 1_000_000


def label_kind(value) -> str | None:
    """INTEGER, NAME, INVALID, or None for an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return INVALID
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):  # parquet integer columns with nulls arrive as floats
        return INTEGER if value.is_integer() else INVALID
    text = str(value).strip()
    if not text:
        return None
    digits = text[1:] if text[0] in "+-" else text
    # isdecimal, not isdigit: exactly what int() accepts ("²" is a digit int() refuses)
    return INTEGER if digits.isdecimal() else NAME


@dataclass(frozen=True)
class LabelMap:
    """How one manifest's labels become KEY.cls integers."""

    index: dict[str, int] | None = None  # name -> label; None: the column holds integers
    count: int | None = None  # with --classnames: labels must be < count

    def label(self, value, where: str) -> tuple[int | None, tuple[str, str] | None]:
        """(label, None), (None, None) for no label, or (None, (reason, detail)) for a recorded failure."""
        kind = label_kind(value)
        if kind is None:
            return None, None
        if kind == INVALID:
            return None, ("invalid_label", f"{where}: label {value!r} is neither an integer nor a class name")
        if self.index is None:
            return self._number(value, kind, where)
        name = str(value).strip()
        if name in self.index:
            return self.index[name], None
        if kind == INTEGER:
            return None, ("mixed_labels", f"{where}: label {name!r} is an integer in a column of class names; "
                                          "use names throughout (or integers throughout)")
        return None, ("unknown_label", f"{where}: class {name!r} is not in the --classnames file; "
                                          "add it there or correct the row")

    def _number(self, value, kind: str, where: str) -> tuple[int | None, tuple[str, str] | None]:
        # A name here means the pass over the column saw none: the manifest changed since. Recorded,
        # not int()'s ValueError, which would end the run with a traceback.
        if kind == NAME:
            return None, ("invalid_label", f"{where}: label {value!r} is a name in a column of integers")
        number = int(float(value)) if isinstance(value, float) else int(str(value).strip())
        if self.count is not None and not 0 <= number < self.count:  # -1 would index from the end
            last = self.count - 1
            return None, ("invalid_label", f"{where}: label {number} is not a line (0 .. {last}) of the "
                                           "--classnames file")
        return number, None


def column_names(values, where: str = "the label column", limit: int | None = None) -> list[str] | None:
    """The sorted class names of a label column's values; None when it holds integers only. More
    than `limit` (default MAX_CLASSES) distinct names is a UserError naming `where` (manifest, column)."""
    limit = MAX_CLASSES if limit is None else limit
    names: set[str] = set()
    for value in values:
        if label_kind(value) == NAME:
            names.add(str(value).strip())
            if len(names) > limit:
                raise UserError(f"{where} holds more than {limit} distinct class names; a label column names "
                                "classes, not one thing per row: pick the right one with --label-column, or "
                                "list the classes with --classnames FILE")
    return sorted(names) if names else None


def has_names(values) -> bool:
    """Whether any label is a class name; stops at the first (with --classnames nothing is collected)."""
    return any(label_kind(v) == NAME for v in values)
