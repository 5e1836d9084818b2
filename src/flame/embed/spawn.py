"""`--devices cuda:0,cuda:1`: one worker process per local device from one command, each run
as torchrun would run it (the same code path, the same store)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

from flame import distributed
from flame.embed.config import Config
from flame.errors import FlameError


def spawn(main: Callable[[Config], int], cfg: Config, devices: list[str]) -> int:
    """Run `main` once per device, as ranks 0..N-1 of one job; -> the first failing exit code."""
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_worker, args=(main, cfg, devices, distributed.free_port()), nprocs=len(devices),
                           start_method="spawn")
    except mp.ProcessExitedException as e:
        return int(e.exit_code or 1)
    return 0


def _worker(index: int, main: Callable[[Config], int], cfg: Config, devices: list[str], port: int) -> None:
    distributed.set_local_launch(index, len(devices), port)
    try:
        code = main(replace(cfg, device=devices[index], devices=None))
    except FlameError as e:
        print(f"flame embed: error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)
