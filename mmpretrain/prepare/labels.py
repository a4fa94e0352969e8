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

INTEGER, NAME, INVALID = "integer", "name", "invalid"


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
    return INTEGER if text.lstrip("+-").isdigit() else NAME


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
            number = int(float(value)) if isinstance(value, float) else int(str(value).strip())
            if self.count is not None and number >= self.count:
                return None, ("invalid_label", f"{where}: label {number} is beyond the {self.count} names "
                                               "of the --classnames file")
            return number, None
        name = str(value).strip()
        if name in self.index:
            return self.index[name], None
        if kind == INTEGER:
            return None, ("mixed_labels", f"{where}: label {name!r} is an integer in a column of class names; "
                                          "use names throughout (or integers throughout)")
        return None, ("unknown_label", f"{where}: class {name!r} is not in the --classnames file")


def column_names(values) -> list[str] | None:
    """The sorted class names of a label column's values; None when it holds integers only."""
    names = {str(v).strip() for v in values if label_kind(v) == NAME}
    return sorted(names) if names else None
