"""The torchrun context: which process this is, and the few collectives solverlab needs.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in
the environment) :func:`context` joins the default process group on first use: backend
``gloo`` on CPU, ``nccl`` when CUDA is available (each process then uses GPU ``LOCAL_RANK``),
with a timeout of ``SOLVERLAB_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT`), so a
rank that dies makes the others fail within that time instead of waiting forever. In a plain
process (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) everything here is a no-op: rank 0 of 1,
:func:`shard` is the whole range, :func:`gather_rows` and :func:`all_reduce_sum` return their
input, :func:`is_main` is true.

Sharding is contiguous: rank ``r`` of ``W`` takes items ``[r n // W, (r + 1) n // W)``, so the
shards differ in length by at most one and, concatenated in rank order, give ``0..n-1``.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import torch
from torch import Tensor

from .errors import SolverlabError

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "Context", "DistributedError", "all_gather_objects",
           "all_reduce_sum", "barrier", "broadcast_object", "context", "from_main",
           "gather_rows", "is_main", "main_only", "shard"]

#: Seconds a collective waits for the other ranks before it fails (``SOLVERLAB_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 120.0
TIMEOUT_ENV = "SOLVERLAB_DIST_TIMEOUT"

T = TypeVar("T")


class DistributedError(SolverlabError, RuntimeError):
    """The torchrun environment is inconsistent, or the process group could not be joined."""


@attrs.frozen(kw_only=True)
class Context:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its
    node), the process-group ``backend`` (``None`` alone), ``active`` (a process group with more
    than one rank is in use) and the ``device`` its work belongs on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    active: bool = False
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    def shard(self, n: int) -> slice:
        """The contiguous part of ``range(n)`` this rank owns (module docstring)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DistributedError(f"shard: n={n!r} must be an integer >= 0")
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: dict[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; "
                               "torchrun sets it, or unset it to run alone") from None


def _timeout(env: dict[str, str]) -> float:
    value = env.get(TIMEOUT_ENV)
    if value is None or value == "":
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise DistributedError(f"environment variable {TIMEOUT_ENV}={value!r} is not allowed; "
                               "give a number of seconds > 0, e.g. 120")
    return seconds


def read_environment(env: dict[str, str] | None = None) -> Context:
    """The :class:`Context` the environment describes, checked, without joining anything: a
    plain process when neither ``RANK`` nor ``WORLD_SIZE`` is set."""
    env = dict(os.environ if env is None else env)
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local = _env_int(env, "LOCAL_RANK")
    if rank is None and world is None:
        return Context()
    if rank is None or world is None:
        given, missing = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise DistributedError(f"environment variable {given} is set but {missing} is not; "
                               "start the job with torchrun (which sets both) or unset "
                               f"{given} to run alone")
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; "
                               "WORLD_SIZE must be >= 1 and 0 <= RANK < WORLD_SIZE")
    if local is None:
        local = rank if world == 1 else None
    if local is None or local < 0:
        raise DistributedError("environment variable LOCAL_RANK must be set to an integer >= 0 "
                               "under torchrun (it is, when torchrun starts the process)")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} not set; start "
                                   "the job with torchrun")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    backend = ("nccl" if cuda else "gloo") if world > 1 else None
    return Context(rank=rank, world_size=world, local_rank=local, backend=backend,
                   active=world > 1, device=device)


@functools.cache
def context() -> Context:
    """This process's :class:`Context`, read once; joins the process group when
    ``WORLD_SIZE > 1`` (module docstring)."""
    ctx = read_environment()
    if not ctx.active:
        return ctx
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run alone")
    if not dist.is_initialized():
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        try:
            dist.init_process_group(
                backend=ctx.backend,
                timeout=datetime.timedelta(seconds=_timeout(dict(os.environ))))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {ctx.rank} of {ctx.world_size} could not join the "
                                   f"process group ({ctx.backend}): {e}") from None
        atexit.register(_leave)
    return ctx


def _leave() -> None:
    """Leave the process group at exit. Without it a rank that finishes first can exit while
    the backend's threads still run: ``terminate called without an active exception``
    (SIGABRT), which torchrun reports as a failed job. The barrier makes every rank leave
    together (bounded by the group's timeout)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


# -- module-level helpers on the current context -------------------------------------------------
def shard(n: int) -> slice:
    """:meth:`Context.shard` of :func:`context`."""
    return context().shard(n)


def is_main() -> bool:
    """Whether this is rank 0 (always, alone): the process that prints and writes files."""
    return context().is_main()


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if context().active:
        import torch.distributed as dist

        dist.barrier()


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """``fn`` run on rank 0 only; the other ranks get ``None`` (printing, writing files)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks of ``tensor``, computed in float64 (returned in float64, on the
    input's device); a float64 copy alone."""
    ctx = context()
    out = tensor.detach().to(torch.float64).clone()
    if not ctx.active:
        return out
    import torch.distributed as dist

    work = out.to(ctx.device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def gather_rows(tensor: Tensor, *, to_all: bool = True) -> Tensor | None:
    """The ranks' ``tensor`` concatenated along dim 0 in rank order (the first dims may differ;
    the others must agree). ``to_all=False``: only rank 0 gets the result, the others ``None``.
    Alone: ``tensor`` itself."""
    ctx = context()
    if not ctx.active:
        return tensor
    import torch.distributed as dist

    work = tensor.detach().to(ctx.device)
    n = torch.tensor([work.shape[0]], dtype=torch.int64, device=ctx.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    # gloo gathers equal shapes only: pad every part to the longest, then cut
    padded = torch.zeros((longest, *work.shape[1:]), dtype=work.dtype, device=ctx.device)
    padded[: work.shape[0]] = work
    if to_all:
        parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
        dist.all_gather(parts, padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(ctx.world_size)] if ctx.rank == 0 \
            else None
        dist.gather(padded, parts, dst=0)
        if parts is None:
            return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device)


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` alone)."""
    ctx = context()
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` alone)."""
    ctx = context()
    if not ctx.active:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its result handed to every rank (``fn()`` alone): file
    reads that must not assume a file system shared between machines. A
    :class:`~solverlab.errors.SolverlabError` it raises is raised on every rank; any other
    exception on rank 0, while the others get a :class:`DistributedError` naming it."""
    ctx = context()
    if not ctx.active:
        return fn()
    outcome: tuple[str, Any] | None = None
    failure: BaseException | None = None
    if ctx.is_main():
        try:
            outcome = ("ok", fn())
        except SolverlabError as e:
            outcome = ("error", e)
        except Exception as e:
            failure = e
            outcome = ("failed", f"{type(e).__name__}: {e}")
    kind, value = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if kind == "error":
        raise value
    if kind == "failed":
        raise DistributedError(f"rank {ctx.rank}: rank 0 failed reading for every rank: {value}")
    return value
