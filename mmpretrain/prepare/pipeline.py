"""`prepare` end to end: check the sources and the output, run the undone blocks (prepare.blocks)
on an engine (this process, one part of N, or Ray), and finalize once every block is done.

A block's files depend on its inputs alone, so shards are byte-identical for any --workers, any
split into parts, any engine, and after any number of kills and resumes.
"""


from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmpretrain import storage
from mmpretrain.errors import UserError
from mmpretrain.prepare.blocks import FINALIZING, PLAN, WORK_DIR, work_url
from mmpretrain.prepare.engines import LocalEngine, streams
from mmpretrain.prepare.fetch import FetchOptions
from mmpretrain.prepare.finalize import HOW, check_complete, finalize, missing_blocks
from mmpretrain.prepare.images import ImageOptions
from mmpretrain.prepare.sources import (
    MANIFESTS,
    ColumnOptions,
    class_names,
    detect_kind,
    manifest_label_names,
)
from mmpretrain.prepare.text import TextOptions
from mmpretrain.shards.layout import DATASET, FAILURES, SIZES, SPLITS, STATS

OUTPUT_FILES = (SIZES, STATS, FAILURES, DATASET)
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class PrepareOptions:
    out: str
    name: str | None = None
    format: str | None = None
    text_only: bool = False
    columns: ColumnOptions = field(default_factory=ColumnOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    text: TextOptions = field(default_factory=TextOptions)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    shard_size: int = 10_000
    max_shard_bytes: int = 0
    val_fraction: float = 0.01
    dedupe: bool = False
    follow_symlinks: bool = False
    workers: int = 1
    threads: int = 16
    in_flight: int = 0  # downloads running or done and waiting for an earlier one; 0: 32 * threads
    overwrite: bool = False
    progress: bool = True
    num_parts: int = 1
    part: int = 0
    finalize_only: bool = False
    engine: str = "local"
    ray_address: str | None = None

    def fingerprint(self, sources: list[str]) -> str:
        settings = asdict(self)
        for key in HOW:
            settings.pop(key)
        settings.pop("fetch")
        settings.pop("out")  # a dataset copied elsewhere is the same dataset
        blob = json.dumps({"settings": settings, "sources": sources}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def run_prepare(sources: list[str], opts: PrepareOptions) -> dict | None:
    """Returns the stats dict (also written to stats.json), or None when other parts are still to
    finish (this part's blocks are done)."""
    _check_parts(opts)
    if opts.engine == "ray":  # before anything is read or written
        from mmpretrain.prepare.ray_engine import require_ray

        require_ray()
    sources = [storage.local_path(s) for s in sources]  # file:// URLs are local paths
    out = _out_url(opts.out)
    plan = _plan(sources, opts, out)
    fingerprint = plan["fingerprint"] = opts.fingerprint([str(p) for p in plan["resolved"]])
    if _already_complete(out, fingerprint, opts.overwrite):
        return json.loads(storage.read_text(storage.join(out, STATS)))
    if opts.finalize_only:
        plan.update(_saved_plan(out, fingerprint))
        check_complete(out, opts.num_parts if opts.num_parts > 1 else None)
        return finalize(out, opts, plan)
    # After the check above: on a 1e8-row CSV the pass over the label column takes minutes
    # (1.2 s per 1e6 rows, measured), which a run with nothing to do should not wait for.
    plan["classes"], plan["named"] = _classes(sources, plan["kinds"], opts)
    _start(out, plan, opts.overwrite)
    if opts.engine == "ray":
        from mmpretrain.prepare.ray_engine import RayEngine

        RayEngine(out, opts, plan).run()
    else:
        LocalEngine(out, opts, plan, opts.num_parts, opts.part).run()
    missing = missing_blocks(out)
    if missing is None and _already_complete(out, fingerprint, False):  # another part finalized meanwhile
        return json.loads(storage.read_text(storage.join(out, STATS)))
    if missing:
        print(f"part {opts.part} of {opts.num_parts} is done; {len(missing)} block(s) of other parts remain. "
              "The last part to finish writes sizes.json, stats.json, failures.jsonl and dataset.json "
              "(or run the same command with --finalize once all are done)", file=sys.stderr)
        return None
    if opts.num_parts == 1:  # the only process of its run
        return finalize(out, opts, plan)
    # Parts that finish together all find nothing missing: the one that creates the claim finalizes.
    claim = work_url(out, FINALIZING)
    if not storage.create_new(claim, json.dumps({"part": opts.part, "host": socket.gethostname(),
                                                 "pid": os.getpid(), "time": time.time()}).encode()):
        print(f"part {opts.part} of {opts.num_parts} is done; another part is writing the dataset files "
              f"({claim}). If that process was killed, run the same command with --finalize", file=sys.stderr)
        return None
    try:
        return finalize(out, opts, plan)
    except BaseException as e:
        storage.remove(claim)  # a rerun of any part may finalize then
        if isinstance(e, UserError) and _already_complete(out, fingerprint, False):
            # The claim was made just after another part finished and removed the work area.
            storage.remove(storage.join(out, WORK_DIR), recursive=True)
            return json.loads(storage.read_text(storage.join(out, STATS)))
        raise


def _check_parts(opts: PrepareOptions) -> None:
    if opts.num_parts < 1 or not 0 <= opts.part < opts.num_parts:
        raise UserError(f"--part {opts.part} is not one of 0 .. {opts.num_parts - 1} (--num-parts {opts.num_parts})")
    if opts.num_parts > 1 and opts.overwrite:
        raise UserError("--overwrite with --num-parts would let each part delete the others' work; "
                        "clear the output once before starting the parts")
    if opts.num_parts > 1 and opts.engine != "local":
        raise UserError(f"--num-parts splits the work between machines you start yourself; --engine {opts.engine} "
                        "schedules it by itself: use one or the other")
    if opts.engine not in ENGINES:
        raise UserError(f"--engine {opts.engine} is not one of {', '.join(ENGINES)}")


def _out_url(out: str) -> str:
    """The output folder as a local absolute path, or the URL as given (no trailing slash)."""
    if storage.is_local(out):
        return str(Path(storage.local_path(out)).resolve())
    return out.rstrip("/")


def _plan(sources: list[str], opts: PrepareOptions, out: str) -> dict:
    if not sources:
        raise UserError("prepare needs at least one SOURCE (a folder, manifest, tar pattern or text file)")
    kinds = [opts.format or detect_kind(s, opts.text_only) for s in sources]
    for source, kind in zip(sources, kinds):
        _check_kind(source, kind)
    if opts.text_only and opts.format not in (None, "text"):
        raise UserError(f"--text-only reads text sources; --format {opts.format} does not apply")
    resolved = []
    for source in sources:
        if storage.is_url(source):
            resolved.append(source)
            continue
        path = Path(source).resolve()
        resolved.append(path if path.exists() else source)
        local_out = Path(out) if storage.is_local(out) else None
        if local_out and path.exists() and path.is_dir() and (local_out == path or path in local_out.parents):
            raise UserError(f"output {opts.out} lies inside source {source}; choose an output folder outside it")
    plan = {"sources": sources, "kinds": kinds, "resolved": resolved, "classes": _folder_classes(sources, kinds),
            "named": [False] * len(sources)}  # the label columns are read by _classes, once this passes
    for source, kind, stream in zip(sources, kinds, streams(plan, opts)):
        # Reading the first input checks columns and patterns before anything is written.
        if next(stream, None) is None:
            raise UserError(f"source {source} holds no inputs (read as {kind}); check the path or --format")
    return plan


def _classes(sources: list[str], kinds: list[str], opts: PrepareOptions) -> tuple[list[str], list[bool]]:
    """(the dataset's class names, whether each source's labels are names): class folders' names and
    manifest label columns of names (prepare.labels), sorted together, or --classnames in its order."""
    folders = _folder_classes(sources, kinds)
    found, named = set(folders), []
    for source, kind in zip(sources, kinds):
        names = manifest_label_names(source, kind, opts.columns) if kind in MANIFESTS else None
        named.append(names is not None)
        found.update(names or ())
    given = list(opts.columns.classnames)
    if not given:
        return sorted(found), named
    # Only a class folder missing from the file stops the run: a manifest's unknown name is one
    # row's `unknown_label` failure.
    if missing := sorted(set(folders) - set(given)):
        raise UserError(f"class folder {missing[0]!r} is not in the --classnames file; add it or drop --classnames")
    return given, named


def _folder_classes(sources: list[str], kinds: list[str]) -> list[str]:
    """The class-folder sources' class names, sorted: a class-folder tree's labels."""
    return sorted({c for s, k in zip(sources, kinds) if k == "classes" for c in class_names(s)})


def _check_kind(source: str, kind: str) -> None:
    """A --format that contradicts what the path is (a folder read as CSV) is the user's to fix."""
    if storage.is_url(source) and not storage.is_local(source):
        if kind in ("folder", "classes"):
            raise UserError(f"source {source}: folder sources are read from a local (or mounted) path; "
                            "for object storage, give a manifest or tar shards")
        return
    path = Path(source)
    if not path.exists():
        if kind != "wds":
            raise UserError(f"source {source} does not exist; check the path")
        return
    wants_folder = kind in ("folder", "classes")
    if wants_folder != path.is_dir() and kind not in ("wds", "text"):
        what = "a folder" if path.is_dir() else "a file"
        raise UserError(f"source {source} is {what}, which --format {kind} cannot read; drop --format or fix it")


def _already_complete(out: str, fingerprint: str, overwrite: bool) -> bool:
    dataset = storage.join(out, DATASET)
    if overwrite or not storage.isfile(dataset):
        return False
    done = json.loads(storage.read_text(dataset)).get("fingerprint")
    if done != fingerprint:
        raise UserError(
            f"{out} already holds a dataset prepared from other sources or settings; "
            "pass --overwrite to replace it or choose another --out"
        )
    print(f"{out} is already complete for these sources and settings; nothing to do", file=sys.stderr)
    return True


def _start(out: str, plan: dict, overwrite: bool) -> None:
    """Clear our own files (--overwrite), refuse a folder with other work in it, or go on with the
    unfinished run of this same command (its done blocks are kept)."""
    plan_file = work_url(out, PLAN)
    if overwrite:
        for split in SPLITS:
            storage.remove(storage.join(out, split), recursive=True)
        storage.remove(storage.join(out, WORK_DIR), recursive=True)
        for name in OUTPUT_FILES:
            storage.remove(storage.join(out, name))
    elif storage.isfile(plan_file):
        if json.loads(storage.read_text(plan_file))["fingerprint"] != plan["fingerprint"]:
            raise UserError(
                f"{out} holds an unfinished run with other sources or settings; "
                "re-run that command to resume it, or pass --overwrite to start over"
            )
        return
    elif any(storage.exists(storage.join(out, split)) for split in SPLITS):
        raise UserError(f"{out} already holds shards; pass --overwrite to replace them or choose another --out")
    storage.makedirs(out)
    # Every part writes the same bytes here, so parts that start together need no coordination.
    saved = {"fingerprint": plan["fingerprint"], "classes": plan["classes"]}
    storage.write_bytes(plan_file, json.dumps(saved))


def _saved_plan(out: str, fingerprint: str) -> dict:
    """What --finalize takes from the parts' plan.json (the class names, read there once)."""
    plan_file = work_url(out, PLAN)
    if not storage.isfile(plan_file):
        raise UserError(f"{out} holds no run to finalize; run the parts first (prepare ... --num-parts N --part I)")
    saved = json.loads(storage.read_text(plan_file))
    if saved["fingerprint"] != fingerprint:
        raise UserError(f"{out} holds parts of a run with other sources or settings; --finalize with the "
                        "parts' own command (the same sources and options)")
    return {"classes": saved["classes"]}
