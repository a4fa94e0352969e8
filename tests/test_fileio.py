"""The one atomic file write, the one atomic directory, and JSON reading with one-line errors."""

from __future__ import annotations

import os
import stat

import pytest

from mmpretrain.errors import UserError
from mmpretrain.fileio import atomic_dir, read_json
from mmpretrain.storage import write_bytes


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_bytes(path, '{"x": 1}')
    assert read_json(path) == {"x": 1} and stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "never") as tmp:
        (tmp / "half").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temp folder, no half folder


def test_atomic_dir_replaces_an_existing_folder_only_when_complete(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # untouched by the interrupted write
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old copy is gone
    with pytest.raises(FileExistsError), atomic_dir(out, replace=False) as tmp:
        pass
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"^.*missing\.json: missing; the folder is incomplete$"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x80\x03cposix\nsystem\n")  # a pickle is not JSON
    with pytest.raises(UserError, match=r"bad\.json: not valid JSON"):
        read_json(bad)
