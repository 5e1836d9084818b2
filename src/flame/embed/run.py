"""`flame embed`'s entry point: the checked plan first, then the release import, the dry run,
local workers for `--devices`, or the job on this process (one rank under torchrun)."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

from flame import distributed
from flame.embed.config import Config
from flame.embed.plan import input_shards, make_plan, output_folder
from flame.embed.report import note
from flame.errors import FlameError


def main(cfg: Config) -> int:
    """Run `flame embed` as configured; 0, or a FlameError (one line, exit 2)."""
    if cfg.import_release is not None:  # the release's stored vectors: no LLM runs
        return import_release(cfg)
    try:
        plan = make_plan(cfg)
    except FlameError:
        if distributed.launch_rank() != 0:  # every rank sees the same bad input; rank 0 says it once
            return 0
        raise
    if cfg.dry_run:
        from flame.embed.dryrun import dry_run

        return dry_run(cfg, plan) if distributed.launch_rank() == 0 else 0
    devices = [d.strip() for d in (cfg.devices or "").split(",") if d.strip()]
    if len(devices) > 1 and distributed.launch_world_size() == 1:
        from flame.embed.spawn import spawn

        return spawn(main, cfg, devices)
    if len(devices) == 1:
        cfg = replace(cfg, device=devices[0])
    from flame.embed.worker import run_job

    logging.getLogger("flame.facets").setLevel(logging.ERROR)  # truncations go to the summary
    # long timeout: ranks wait for each other only at the start and at the end
    device = distributed.init(cfg.device, timeout=timedelta(days=7))
    try:
        return distributed.report_once(lambda: run_job(cfg, plan, str(device)))
    finally:
        distributed.shutdown()


def import_release(cfg: Config) -> int:
    """`--import-release ROOT`: file copying, so one process (rank 0) does it all."""
    from flame.release import ImportJob, run_import

    if distributed.launch_rank() != 0:
        return 0
    job = ImportJob(cfg.import_release, input_shards(cfg), output_folder(cfg), layout=cfg.release_layout,
                    dtype=cfg.dtype, on_missing=cfg.on_missing, overwrite=cfg.overwrite)
    return run_import(job, notify=note)
