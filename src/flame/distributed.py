"""Every torch.distributed concern in one place.

`flame train` and `flame embed` run as one process per device, launched by torchrun (single or multi node);
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which `init()`
reads (this is the only module that reads them). Without them everything here degrades to
single-process no-ops.

Ranks agree on an error one way: `AgreedError`, raised on every rank at the same collective
point, rank 0 reporting it and the others leaving quietly (`report_once`). It comes from
`check_errors` (each rank may have failed) or `decide` (rank 0 alone does a step).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

from flame.errors import FlameError

# a CPU (gloo) group for control messages (error checks) when the main backend is nccl, so that
# checking for an error never waits on the GPU queue; None = the default group
_control = None
T = TypeVar("T")


class AgreedError(FlameError):
    """An error every rank raised at the same collective point: rank 0 reports it, the others
    exit quietly (see `check_errors`)."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """This process's rank as its launcher (torchrun, `flame embed --devices`) set it: known
    before `init()`, when every rank reads the same settings and rank 0 alone reports them."""
    return int(os.environ.get("RANK", "0") or 0)


def launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def set_local_launch(index: int, world: int, port: int) -> None:
    """The environment torchrun would give worker `index` of `world` on this host (`--devices`)."""
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


MAX_DEFAULT_WORKERS = 16


def default_loader_workers() -> int:
    """Data-loader processes per rank when the user sets none: this rank's share of the CPUs it
    may run on (affinity / cgroup set, over LOCAL_WORLD_SIZE ranks on the host) less one for the
    rank's own process, 1 to MAX_DEFAULT_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_WORKERS, per_rank - 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> this rank's GPU if there is one, else the CPU; "cuda" -> cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:") and launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise FlameError(f"--device {device} under torchrun would put every rank on one GPU: use --device cuda "
                         "(each rank takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FlameError("--device cuda requested but no CUDA device is available")
        if device == "cuda":
            device = f"cuda:{local_rank() % torch.cuda.device_count()}"
    return torch.device(device)


def init(device: str = "auto", timeout: datetime.timedelta = datetime.timedelta(minutes=30),
         control: bool | None = None) -> torch.device:
    """Initialise the process group from torchrun's env (nccl on CUDA, gloo on CPU) and
    return this process's device. `timeout` bounds how long ranks wait for each other.
    `control`: a separate gloo group for the error agreements (`first_error`, `decide`), so that
    they never queue behind GPU work; default: with nccl. On hosts with several network
    interfaces gloo may need GLOO_SOCKET_IFNAME (as NCCL needs NCCL_SOCKET_IFNAME)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_initialized():
        start_group(dev, timeout, control)
    return dev


def start_group(dev: torch.device, timeout: datetime.timedelta, control: bool | None = None) -> None:
    """The process group from the launcher's environment: nccl on CUDA, gloo on the CPU, and the
    gloo control group as `init` says. `init` starts it for a job of several ranks; `flame bench
    gpu` starts it at world size 1 to check NCCL and the side channel on one GPU."""
    global _control
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    if control if control is not None else backend != "gloo":
        _control = dist.new_group(backend="gloo", timeout=timeout)


def control_group():
    """The gloo group of control messages beside nccl (None: the default group carries them)."""
    return _control


def shutdown() -> None:
    global _control
    if is_initialized():
        dist.destroy_process_group()
    _control = None


def barrier() -> None:
    if is_initialized():
        dist.barrier()


WAIT_FOR_MAIN = datetime.timedelta(days=7)
_waits = 0  # wait_for_main calls so far (the same on every rank)


def wait_for_main(timeout: datetime.timedelta = WAIT_FOR_MAIN) -> None:
    """Every rank meets here; the others wait for rank 0 (busy alone, e.g. evaluating during
    training) up to `timeout`, not the process group's timeout (30 minutes), which a long
    evaluation would run past in the next collective. The wait is on the rendezvous store (rank 0
    sets one key per meeting when it arrives), which takes its own timeout and costs no GPU;
    collectives resume once everyone is here."""
    global _waits
    if not is_initialized() or dist.get_world_size() < 2:
        return
    _waits += 1
    store = dist.distributed_c10d._get_default_store()
    key = f"flame/wait_for_main/{_waits}"
    if dist.get_rank() == 0:
        store.set(key, "1")
    else:
        store.wait([key], timeout)


def leave_together() -> None:
    """A barrier before the process group goes: a gloo rank that exits with its last send still in
    flight can abort ('terminate called without an active exception'), and torchrun would then stop
    rank 0 before it has printed. Only where every rank is known to be at the same point."""
    try:
        barrier()
    except Exception:  # a peer already gone: nothing to wait for
        pass


def all_gather_constant(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order. No gradient flows back:
    this is for constant inputs (the frozen LLM's text embeddings). Same shape on all ranks."""
    return start_gather_constant(x).wait()


class Gathering:
    """An `all_gather_constant` in flight (issued with async_op): the work between `start_gather_constant`
    and `wait` (a training step's forward) overlaps the transfer. On CUDA `wait` only makes the current
    stream wait for the collective; the host does not block."""

    def __init__(self, x: torch.Tensor):
        self._done: torch.Tensor | None = x if world_size() == 1 else None
        if self._done is None:
            x = x.detach().contiguous()
            self._parts = [torch.empty_like(x) for _ in range(world_size())]
            self._work = dist.all_gather(self._parts, x, async_op=True)

    def wait(self) -> torch.Tensor:
        """The rank-ordered concatenation (waited for once; later calls return it)."""
        if self._done is None:
            self._work.wait()
            self._done = torch.cat(self._parts, dim=0)
            del self._parts, self._work
        return self._done


def start_gather_constant(x: torch.Tensor) -> Gathering:
    """Issue `all_gather_constant(x)` and return at once; `.wait()` gives the result."""
    return Gathering(x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum, over every rank, of the gradient that
    reached its own slice (an all-reduce: works on gloo as on nccl)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = x.shape[0], rank()
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order, with the gradient flowing back
    to every rank's own part (for losses that score each rank's texts against every rank's image
    embeddings). Same shape on all ranks; every rank must run the backward."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()


def all_reduce_sum_int(values: list[int], device: torch.device) -> list[int]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def first_error(error: str | None) -> str | None:
    """A collective (every rank calls it at the same point): each rank passes its own error
    message or None; every rank gets the first one in rank order ("rank R: ..." for R > 0), or
    None when no rank failed. Costs one tiny CPU all-reduce when nobody failed."""
    if world_size() == 1:
        return error
    flag = torch.tensor([1 if error else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control)
    if not flag.item():
        return None
    errors: list = [None] * world_size()
    dist.all_gather_object(errors, error, group=_control)
    r, msg = next((r, e) for r, e in enumerate(errors) if e)
    return msg if r == 0 else f"rank {r}: {msg}"


def check_errors(error: str | None) -> None:
    """`first_error`, raised on every rank as an AgreedError, so that a user error on one rank
    stops all of them at once instead of leaving the others waiting in a collective."""
    first = first_error(error)
    if first:
        raise AgreedError(first)


def decide(fn: Callable[[], T]) -> T:
    """A collective: run `fn` on rank 0 alone (take a lock, open a store) and hand its result to
    every rank. A FlameError there becomes an AgreedError on every rank, as in `check_errors`."""
    if world_size() == 1:
        return fn()
    box: list = [None, None]  # [error message, result]
    if is_main():
        try:
            box[1] = fn()
        except FlameError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0, group=_control)
    if box[0] is not None:
        raise AgreedError(box[0])
    return box[1]


def report_once(fn: Callable[[], int]) -> int:
    """Run a job's body on this rank so that each error is reported once: an AgreedError is
    raised on rank 0 only (the others return 0, which keeps torchrun from stopping rank 0
    before it has printed); any other FlameError is this rank's own, named "rank R: ..."."""
    try:
        return fn()
    except AgreedError:
        leave_together()
        if not is_main():
            return 0
        raise
    except FlameError as e:
        if not is_main():
            raise FlameError(f"rank {rank()}: {e}") from e
        raise


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextmanager
def no_sync(model: torch.nn.Module, skip: bool):
    """DDP's no_sync() for gradient-accumulation micro-steps (no-op otherwise)."""
    if skip and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
