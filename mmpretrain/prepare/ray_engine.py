"""`prepare --engine ray`: the undone blocks (prepare.blocks) as Ray tasks over a cluster's nodes.

The driver (where `prepare` runs) reads the sources in order, as the local engine does, and hands
each block's inputs to one task, `engines.process_block`, which downloads on threads and processes
the images on the one CPU it asks for. At most two tasks per CPU of the cluster are submitted or
running at once, so the driver holds at most that many blocks of inputs (back-pressure on the
source reader). A task whose node dies is rerun by Ray elsewhere: a block's files depend only on
its inputs and appear only when complete, and its summary is written last, so a rerun writes the
same bytes and a half-made block is simply not done. The driver then finalizes as any run does.

Cluster: `--ray-address`, else Ray's own RAY_ADDRESS, else a Ray started on this machine for the
run. Every node needs this package (the same version) and read access to the sources: object
storage or URLs anywhere; folders and local manifests only on a filesystem all nodes mount. The
output, likewise, is s3://... or a shared filesystem.
"""

from __future__ import annotations

import itertools
import logging
import os

from tqdm import tqdm

from mmpretrain.errors import UserError
from mmpretrain.prepare.blocks import done_blocks
from mmpretrain.prepare.engines import InputCount, process_block, record_inputs

INSTALL_HINT = "--engine ray needs Ray: pip install 'mmpretrain-clip[ray]'"
TASKS_PER_CPU = 2
TASK_RETRIES = 3  # reruns of a block whose worker or node died


def require_ray():
    """The ray module, or the one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


class RayEngine:
    """Every undone block of the run, one Ray task each."""

    def __init__(self, out: str, opts, plan: dict):
        self.out, self.opts, self.plan = out, opts, plan
        self.ray = require_ray()

    def run(self) -> None:
        ray = self.ray
        started_here = self._connect()
        try:
            self._run_tasks()
        finally:
            if started_here:
                ray.shutdown()

    def _connect(self) -> bool:
        """Join the cluster; True when this call started a Ray of its own (to be shut down after)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        address = self.opts.ray_address or os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     **({} if address else {"include_dashboard": False}))
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise UserError(f"could not connect to {where} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            "check --ray-address / RAY_ADDRESS and that the cluster is up") from None
        return address is None

    def _run_tasks(self) -> None:
        ray, opts = self.ray, self.opts
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(process_block)
        shared_opts, shared_plan = ray.put(opts), ray.put(self.plan)
        window = max(1, int(ray.cluster_resources().get("CPU", 1)) * TASKS_PER_CPU)
        done = done_blocks(self.out)
        inputs = InputCount(self.plan, opts, lambda b: b not in done)
        blocks = itertools.groupby(inputs, key=lambda inp: inp.index // opts.shard_size)
        bar = tqdm(desc="prepare", unit="sample", disable=None if opts.progress else True, dynamic_ncols=True)
        pending: list = []
        failed = 0
        try:
            for block, members in blocks:
                if len(pending) >= window:
                    failed += self._collect(pending, bar, failed, wait_for=1)
                pending.append(task.remote(self.out, shared_opts, shared_plan, block, list(members)))
            while pending:
                failed += self._collect(pending, bar, failed, wait_for=1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
        record_inputs(self.out, inputs.total, opts.shard_size)

    def _collect(self, pending: list, bar, failed: int, wait_for: int) -> int:
        """Wait for `wait_for` tasks; count their samples on the bar. Returns the failures they had."""
        ray = self.ray
        finished, still = ray.wait(pending, num_returns=wait_for)
        pending[:] = still
        new_failures = 0
        for ref in finished:
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from None
                raise
            splits = summary["splits"].values()
            new_failures += sum(s["failed"] for s in splits)
            bar.update(sum(s["inputs"] for s in splits))
            if new_failures:
                bar.set_postfix(failed=failed + new_failures, refresh=False)
        return new_failures
