"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, arXiv 2310.13268):
the data object, its safetensors file, and their computation for any registered model.

DPM-Solver-v3 rewrites the probability-flow ODE ``dx/dlambda = (dlog alpha/dlambda) x -
sigma eps(x, lambda)`` with three per-dimension functions of the half log-SNR ``lambda``
(Zheng et al. 2023, eqs. 8-10): ``l`` splits a linear part off the model,

    N(x, lambda) = sigma eps - l x,    f = N / alpha = e^{-lambda} eps - l x/alpha,

and ``s``, ``b`` model the total derivative of ``f`` along the ODE as affine in ``f``,
``f' ~ s f + b``. The optimal values minimise the first-order discretisation error (eqs. 13,
14): ``l`` is the expected diagonal of the Jacobian of ``sigma eps`` in ``x``, and ``(s, b)``
the per-dimension least-squares fit of ``f'`` on ``f``, expectations over the forward
marginal ``x = alpha x0 + sigma z`` with ``x0`` from the training data.

:func:`compute_ems` estimates them on a grid uniform in ``lambda`` (Section 3.3/Appendix C of
the paper; the official code leaves this part to the user):

- ``l``: Hutchinson's estimator ``E[v * (J v)]`` with Rademacher ``v``, one forward-mode JVP
  (``torch.func.jvp``) per sample;
- ``f'``: one JVP of ``eps`` along the ODE tangent ``(dx/dlambda, dt/dlambda)``; with
  ``d(x/alpha)/dlambda = -e^{-lambda} eps`` (any schedule),
  ``f' = e^{-lambda}((l - 1) eps + eps') - l' x/alpha``, where ``l' = dl/dlambda`` comes from
  finite differences of ``l`` on the grid (optionally smoothed by a moving average, as the
  official statistics script does);
- the regression needs only first and second moments of ``e = e^{-lambda} eps``,
  ``y = x/alpha`` and ``q = e^{-lambda}(eps' - eps)`` (``f = e - l y``, ``f' = l e + q - l'
  y``), so one pass over the grid accumulates them and ``l``, ``l'``, ``s``, ``b`` follow.

The same ``K`` data points, noises ``z`` and probes ``v`` are used at every grid point (common
random numbers): the Monte-Carlo error of ``l`` is then a smooth function of ``lambda``, which
keeps the finite-difference ``l'`` (and so ``s``, ``b``) from amplifying it.

Where ``f`` has (numerically) no variance in a dimension, the regression is degenerate and
``s = 0``, ``b = E[f']`` (a Gaussian's exact ``l`` makes ``f`` constant in ``x`` in every
dimension where its covariance is diagonal).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from ._io import atomic_write, read_safetensors
from .errors import InputError, OptionError, SolverlabError
from .model import Denoiser, Model
from .schedule import Schedule

__all__ = ["EMS", "EMSError", "EMSFileError", "EMSMismatchError", "compute_ems",
           "model_fingerprint", "schedule_parameters"]

F64 = torch.float64
FORMAT = "solverlab-ems/1"
#: Noise for samples ``k`` comes from a generator seeded per block of this many samples, so
#: the estimate does not depend on ``batch_size`` (and a resumed run draws the same noise).
_BLOCK = 256
#: ``var(f) <= _DEGENERATE * E[f^2]`` counts as no variance (see the module docstring).
_DEGENERATE = 1e-10
_MOMENTS = ("l", "e", "y", "q", "ee", "yy", "ey", "eq", "qy")


class EMSError(SolverlabError):
    """Base of the EMS errors."""


class EMSFileError(EMSError, InputError):
    """An EMS file cannot be read: missing, truncated, corrupt, not an EMS file, or holding
    non-finite statistics."""


class EMSMismatchError(EMSError, OptionError):
    """An EMS does not belong to the model, schedule, shape or time range it is used with; the
    message names the field and both values."""


# -- fingerprints --------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        t = v.detach().to("cpu").contiguous()
        if t.numel() <= 8:
            return t.tolist()
        return "sha256:" + hashlib.sha256(t.to(F64).numpy().tobytes()).hexdigest()[:16]
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, float):
        return float(f"{v:.15g}")
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    return repr(v)


def schedule_parameters(schedule: Schedule) -> dict[str, Any]:
    """The schedule's options as JSON-able values (tensors longer than 8 as a hash)."""
    if attrs.has(type(schedule)):
        fields = {a.name: getattr(schedule, a.name) for a in attrs.fields(type(schedule))
                  if a.init}
    else:
        fields = {"t_min": schedule.t_min, "t_max": schedule.t_max}
    return {k: _jsonable(v) for k, v in sorted(fields.items())}


def model_fingerprint(model: Any) -> str | None:
    """A hash of the model's parameters: the ``state_dict`` of a :class:`~solverlab.TorchModel`'s
    module (names, shapes, values), or the distribution of an analytic model; ``None`` for
    other models (which then cannot be told apart)."""
    if isinstance(model, Denoiser):
        model = model.model
    module = getattr(model, "module", None)
    h = hashlib.sha256()
    if isinstance(module, torch.nn.Module):
        for name, t in module.state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return "torch:" + h.hexdigest()[:24]
    data = getattr(model, "data", None)
    if data is not None and attrs.has(type(data)):
        for a in attrs.fields(type(data)):
            v = getattr(data, a.name)
            if isinstance(v, Tensor):
                h.update(a.name.encode())
                h.update(v.detach().to("cpu", F64).contiguous().numpy().tobytes())
        return f"{type(data).__name__}:" + h.hexdigest()[:24]
    return None


# -- the data object -----------------------------------------------------------------------
def _f64_table(value: Any) -> Tensor:
    return torch.as_tensor(value, dtype=F64).contiguous()


@attrs.frozen(kw_only=True, eq=False)
class EMS:
    """Empirical model statistics on a grid uniform in ``lambda``.

    - ``lam``: ``(N + 1,)`` float64, increasing (from ``t_start`` to ``t_end``);
    - ``l``, ``s``, ``b``: ``(N + 1, *shape)`` float64, one per grid point, shaped like one
      sample;
    - metadata: ``schedule`` (name) and ``schedule_params``, ``parameterization`` of the model,
      ``t_start``, ``t_end``, ``samples`` (``K``), ``guidance_scale`` (``None``: unguided),
      ``model`` (:func:`model_fingerprint`), ``smoothing`` (half-width of the ``l'`` moving
      average).

    ``save(path)`` writes one safetensors file atomically; ``EMS.load(path, model=..., shape=...,
    t_end=...)`` reads it and, for what is given, checks it belongs
    (:meth:`check`: :class:`EMSMismatchError` naming the field and both values).
    """

    lam: Tensor = attrs.field(converter=_f64_table)
    l: Tensor = attrs.field(converter=_f64_table)  # noqa: E741 (the paper's name)
    s: Tensor = attrs.field(converter=_f64_table)
    b: Tensor = attrs.field(converter=_f64_table)
    schedule: str
    schedule_params: Mapping[str, Any] = attrs.field(factory=dict)
    parameterization: str = "noise"
    t_start: float = attrs.field(converter=float)
    t_end: float = attrs.field(converter=float)
    samples: int = 0
    guidance_scale: float | None = None
    model: str | None = None
    smoothing: int = 0

    def __attrs_post_init__(self) -> None:
        n = self.lam.shape[0] if self.lam.ndim == 1 else -1
        if n < 2:
            raise EMSFileError(f"EMS: lam must be a 1-D grid of at least 2 points; got shape "
                               f"{tuple(self.lam.shape)}")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if v.ndim < 1 or v.shape[0] != n or v.shape != self.l.shape:
                raise EMSFileError(f"EMS: {name} has shape {tuple(v.shape)}; expected ({n}, "
                                   f"*shape) like l {tuple(self.l.shape)}")
        d = torch.diff(self.lam)
        if not bool((d > 0).all()):
            raise EMSFileError("EMS: the lambda grid must be strictly increasing")
        for name in ("lam", "l", "s", "b"):
            v = getattr(self, name)
            if not bool(torch.isfinite(v).all()):
                bad = int((~torch.isfinite(v)).sum())
                raise EMSFileError(
                    f"EMS: statistic {name!r} holds {bad} NaN or infinite value(s); recompute "
                    "the EMS (more samples, or a t_end where the model is finite)")

    @property
    def grid_size(self) -> int:
        """``N``: the number of grid intervals."""
        return self.lam.shape[0] - 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(self.l.shape[1:])

    @classmethod
    def degenerated(cls, schedule: Schedule, shape: tuple[int, ...], t_start: float,
                    t_end: float, *, max_cell: float = 0.05) -> EMS:
        """``l = 1, s = b = 0`` (Zheng et al. 2023, Section 3.1: DPM-Solver++'s data
        prediction), on a grid fine enough (cells ``<= max_cell`` in ``lambda``) that the
        quadrature of the sampler is exact to round-off."""
        lam0 = float(schedule.lambda_(torch.tensor(t_start, dtype=F64)))
        lam1 = float(schedule.lambda_(torch.tensor(t_end, dtype=F64)))
        n = max(2, math.ceil((lam1 - lam0) / max_cell))
        lam = torch.linspace(lam0, lam1, n + 1, dtype=F64)
        ones = torch.ones((n + 1, *shape), dtype=F64)
        return cls(lam=lam, l=ones, s=torch.zeros_like(ones), b=torch.zeros_like(ones),
                   schedule=schedule.name, schedule_params=schedule_parameters(schedule),
                   t_start=t_start, t_end=t_end, model="degenerated")

    # -- checks ------------------------------------------------------------------------------
    def check(self, model: Model | Denoiser | None = None, *, shape: tuple[int, ...] | None = None,
              t_end: float | None = None, t_start: float | None = None) -> EMS:
        """Raise :class:`EMSMismatchError` unless this EMS belongs to ``model`` (schedule name
        and parameters, fingerprint where both have one), to samples of ``shape`` and to a solve
        ending at ``t_end`` (equal to the EMS's ``t_end`` up to 1e-9 relative); returns self."""
        if model is not None:
            sched = model.schedule
            self._same("schedule", self.schedule, sched.name)
            self._same("schedule parameters", dict(self.schedule_params),
                       schedule_parameters(sched))
            fp = model_fingerprint(model)
            if self.model not in (None, "degenerated") and fp is not None:
                self._same("model fingerprint", self.model, fp,
                           hint="the EMS were computed for another network or distribution")
        if shape is not None:
            self._same("data shape", self.shape, tuple(shape))
        if t_end is not None and not math.isclose(self.t_end, float(t_end), rel_tol=1e-9,
                                                  abs_tol=1e-12):
            self._same("t_end", self.t_end, float(t_end),
                       hint="EMS depend on t_end (Zheng et al. 2023 compute one set per t_end)")
        if t_start is not None and not math.isclose(self.t_start, float(t_start), rel_tol=1e-9,
                                                    abs_tol=1e-12):
            self._same("t_start", self.t_start, float(t_start))
        return self

    def _same(self, field: str, ours: Any, theirs: Any, hint: str = "") -> None:
        if ours != theirs:
            raise EMSMismatchError(
                f"EMS field {field!r} differs: the EMS has {ours!r}, the use needs {theirs!r}"
                + (f"; {hint}" if hint else "") + "; compute EMS for this setting "
                "(solverlab.compute_ems or `solverlab ems`)")

    def covers(self, lam_start: float, lam_end: float) -> None:
        """Raise :class:`EMSMismatchError` unless ``[lam_start, lam_end]`` lies within the grid
        (1e-9 slack)."""
        lo, hi = float(self.lam[0]), float(self.lam[-1])
        slack = 1e-9 * max(1.0, abs(lo), abs(hi))
        if lam_start < lo - slack or lam_end > hi + slack:
            raise EMSMismatchError(
                f"EMS field 'lambda range' differs: the EMS grid covers lambda in [{lo:.6g}, "
                f"{hi:.6g}] (t {self.t_start:.6g} -> {self.t_end:.6g}), the solve needs "
                f"[{lam_start:.6g}, {lam_end:.6g}]; compute EMS with t_end at or below the "
                "solve's end time")

    # -- file ----------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT, "schedule": self.schedule,
            "schedule_params": json.dumps(dict(self.schedule_params), sort_keys=True),
            "parameterization": self.parameterization, "t_start": repr(self.t_start),
            "t_end": repr(self.t_end), "grid_size": str(self.grid_size),
            "samples": str(self.samples), "guidance_scale": json.dumps(self.guidance_scale),
            "shape": json.dumps(list(self.shape)), "model": json.dumps(self.model),
            "smoothing": str(self.smoothing),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (tensors ``lam``, ``l``, ``s``, ``b``; metadata as
        strings), atomically: an interrupted write leaves any old file intact."""
        from safetensors.torch import save

        blob = save({k: getattr(self, k).contiguous() for k in ("lam", "l", "s", "b")},
                    metadata=self.metadata())
        return atomic_write(path, lambda f: f.write(blob), binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: Model | Denoiser | None = None,
             shape: tuple[int, ...] | None = None, t_end: float | None = None) -> EMS:
        """Read an EMS file (:meth:`save`) and :meth:`check` it against what is given.
        :class:`EMSFileError` for a missing, truncated or corrupt file or non-finite values."""
        tensors, meta = _read(path)
        try:
            ems = cls(lam=tensors["lam"], l=tensors["l"], s=tensors["s"], b=tensors["b"],
                      schedule=meta["schedule"],
                      schedule_params=json.loads(meta["schedule_params"]),
                      parameterization=meta["parameterization"], t_start=float(meta["t_start"]),
                      t_end=float(meta["t_end"]), samples=int(meta["samples"]),
                      guidance_scale=json.loads(meta["guidance_scale"]),
                      model=json.loads(meta["model"]), smoothing=int(meta["smoothing"]))
        except EMSFileError as e:
            raise EMSFileError(f"EMS file {str(path)!r}: {e}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise EMSFileError(f"EMS file {str(path)!r} lacks or garbles {e}; is it an EMS file "
                               "written by solverlab?") from None
        if list(ems.shape) != json.loads(meta.get("shape", "null") or "null"):
            raise EMSFileError(f"EMS file {str(path)!r}: tensor shape {ems.shape} does not match "
                               f"its metadata shape {meta.get('shape')}")
        return ems.check(model, shape=shape, t_end=t_end)


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors, meta = read_safetensors(path, f"EMS file {str(path)!r}", EMSFileError)
    if meta.get("format") != FORMAT:
        raise EMSFileError(f"EMS file {str(path)!r} has format {meta.get('format')!r}; expected "
                           f"{FORMAT!r}")
    return tensors, meta


# -- computation ---------------------------------------------------------------------------
def _eps_fn(model: Model) -> Callable[[Tensor, Tensor], Tensor]:
    sched, param = model.schedule, model.parameterization

    def eps(x: Tensor, t: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        a = sched.alpha(t).to(x.dtype).view(shape)
        s = sched.sigma(t).to(x.dtype).view(shape)
        return param.to_noise(model(x, t), x, a, s)

    return eps


def _moving_average(v: Tensor, half: int) -> Tensor:
    if half <= 0:
        return v
    n = v.shape[0]
    c = torch.cat([torch.zeros_like(v[:1]), torch.cumsum(v, 0)])
    idx = torch.arange(n)
    lo, hi = (idx - half).clamp(min=0), (idx + half + 1).clamp(max=n)
    w = (hi - lo).to(F64).view((-1,) + (1,) * (v.ndim - 1))
    return (c[hi] - c[lo]) / w


def _derivative(v: Tensor, lam: Tensor) -> Tensor:
    """``dv/dlambda`` on a uniform grid: central inside, one-sided second order at the ends."""
    h = float(lam[1] - lam[0])
    out = torch.empty_like(v)
    if v.shape[0] == 2:
        out[:] = (v[1] - v[0]) / h
        return out
    out[1:-1] = (v[2:] - v[:-2]) / (2 * h)
    out[0] = (-3 * v[0] + 4 * v[1] - v[2]) / (2 * h)
    out[-1] = (3 * v[-1] - 4 * v[-2] + v[-3]) / (2 * h)
    return out


def statistics_from_moments(means: Tensor, lam: Tensor, smoothing: int
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``(l, s, b)`` from the accumulated means (``(N + 1, 9, D)``, in the order ``l, e, y, q,
    ee, yy, ey, eq, qy``; see the module docstring)."""
    ml, e, y, q, ee, yy, ey, eq, qy = means.unbind(1)
    l = ml  # noqa: E741
    dl = _moving_average(_derivative(l, lam), smoothing)
    var_e, var_y, cov_ey = ee - e * e, yy - y * y, ey - e * y
    cov_eq, cov_qy = eq - e * q, qy - q * y
    # f = e - l y, f' = l e + q - l' y
    var_f = var_e - 2 * l * cov_ey + l * l * var_y
    cov = (l * var_e + cov_eq - dl * cov_ey - l * l * cov_ey - l * cov_qy + l * dl * var_y)
    mf, mfp = e - l * y, l * e + q - dl * y
    second = var_f + mf * mf
    ok = var_f > _DEGENERATE * second.clamp(min=1e-300)
    s = torch.where(ok, cov / torch.where(ok, var_f, torch.ones_like(var_f)),
                    torch.zeros_like(var_f))
    b = mfp - s * mf
    return l, s, b


def _partial_meta(cfg: dict[str, Any]) -> dict[str, str]:
    return {"format": FORMAT + "-partial", "config": json.dumps(cfg, sort_keys=True)}


def compute_ems(
    model: Model,
    data: Tensor,
    *,
    grid_size: int = 400,
    t_start: float | None = None,
    t_end: float | None = None,
    samples: int | None = None,
    batch_size: int = 1024,
    seed: int = 0,
    smoothing: int = 0,
    guidance_scale: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: float = 10.0,
    progress: bool | None = None,
) -> EMS:
    """Estimate the EMS of ``model`` (module docstring; Zheng et al. 2023, eqs. 13-14).

    - ``data``: training samples ``(n, *shape)`` (for analytic models, draws from their data
      distribution); the dtype of ``data`` is the dtype the model is evaluated in;
    - ``grid_size`` ``N``: ``N + 1`` points uniform in ``lambda`` from ``t_start`` (default
      ``schedule.t_max``) to ``t_end`` (default ``schedule.t_min``);
    - ``samples`` ``K`` (default ``min(n, 1024)``): data points per grid point (a random
      subset of ``data`` chosen by ``seed``; with replacement if ``K > n``), the same at every
      grid point, each with its noise and Rademacher probe;
    - ``batch_size``: rows (grid points x samples) per model call: bounds memory;
    - ``smoothing``: half-width of a moving average on ``l'`` (default 0: none). The official
      script smooths over +-5 points against the noise of fresh samples at each grid point;
      with the common random numbers used here ``l`` is already smooth in ``lambda`` and the
      average only adds bias (measured on a 4-D Gaussian, 60 cells: max error of ``s`` 0.76
      with +-5, 0.05 without);
    - ``checkpoint``: a file for partial results, rewritten atomically every
      ``checkpoint_every`` seconds; a run started with the same arguments resumes from it (and
      removes it when done);
    - ``progress``: a tqdm bar (``None``: when stderr is a terminal).

    Cost: two forward-mode JVPs per sample per grid point. Returns an :class:`EMS`.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, Model):
        raise OptionError(f"compute_ems: model={model!r} is not a solverlab.Model")
    if not isinstance(data, Tensor) or not data.is_floating_point() or data.ndim < 2 \
            or data.shape[0] < 1:
        raise InputError("compute_ems: data must be a floating-point tensor (n, *shape) of "
                         "training samples with n >= 1; got "
                         + (f"{data.dtype} {tuple(data.shape)}" if isinstance(data, Tensor)
                            else type(data).__name__))
    if not bool(torch.isfinite(data).all()):
        raise InputError("compute_ems: data holds NaN or infinite values")
    for name, v, low in (("grid_size", grid_size, 1), ("batch_size", batch_size, 1),
                         ("smoothing", smoothing, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise OptionError(f"compute_ems: option {name}={v!r} is not allowed; give an int "
                              f">= {low}")
    n = data.shape[0]
    k_total = min(n, 1024) if samples is None else samples
    if isinstance(k_total, bool) or not isinstance(k_total, int) or k_total < 2:
        raise OptionError(f"compute_ems: option samples={samples!r} is not allowed; give an int "
                          ">= 2")
    sched = model.schedule
    t0 = sched.t_max if t_start is None else float(t_start)
    t1 = sched.t_min if t_end is None else float(t_end)
    if not (sched.t_min <= t1 < t0 <= sched.t_max):
        raise OptionError(f"compute_ems: need t_min <= t_end < t_start <= t_max of "
                          f"{sched.name!r} ([{sched.t_min:.6g}, {sched.t_max:.6g}]); got "
                          f"t_start={t0!r}, t_end={t1!r}")
    lam0 = float(sched.lambda_(torch.tensor(t0, dtype=F64)))
    lam1 = float(sched.lambda_(torch.tensor(t1, dtype=F64)))
    lam = torch.linspace(lam0, lam1, grid_size + 1, dtype=F64)
    lam[0], lam[-1] = lam0, lam1
    t_grid = sched.t_of_lambda(lam)
    t_grid[0], t_grid[-1] = t0, t1
    shape, dim, dtype = tuple(data.shape[1:]), math.prod(data.shape[1:]), data.dtype
    fp = model_fingerprint(model)
    cfg = {"schedule": sched.name, "schedule_params": schedule_parameters(sched), "t_start": t0,
           "t_end": t1, "grid_size": grid_size, "samples": k_total, "seed": seed,
           "shape": list(shape), "model": fp, "data": _jsonable(data), "dtype": str(dtype)}

    # Under torchrun each rank takes a contiguous part of the grid points (each point's
    # moments are sums over the same samples, independent of the other points) and keeps its
    # own partial file; the moment sums are added over the ranks in float64 at the end.
    from . import distributed

    ctx = distributed.context()
    mine = ctx.shard(grid_size + 1)
    if checkpoint is not None and ctx.active:
        checkpoint = f"{os.fspath(checkpoint)}.rank{ctx.rank}of{ctx.world_size}"
    acc = torch.zeros(grid_size + 1, len(_MOMENTS), dim, dtype=F64)
    done = torch.zeros(grid_size + 1, dtype=torch.bool)
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            tensors, meta = _read_partial(checkpoint)
        except EMSFileError:
            tensors, meta = None, {}
        if tensors is not None and meta.get("config") == json.dumps(cfg, sort_keys=True):
            acc, done = tensors["acc"].to(F64), tensors["done"].to(torch.bool)

    gen = torch.Generator().manual_seed(seed)
    idx = (torch.randperm(n, generator=gen)[:k_total] if k_total <= n
           else torch.randint(n, (k_total,), generator=gen))
    eps_fn = _eps_fn(model)
    kb = min(k_total, batch_size, _BLOCK)
    gp = max(1, batch_size // kb)
    todo = [int(j) for j in torch.nonzero(~done).flatten() if mine.start <= j < mine.stop]
    show = (os.isatty(2) if progress is None else bool(progress)) and ctx.is_main()
    owned = mine.stop - mine.start
    bar = tqdm(total=owned, initial=owned - len(todo), desc="EMS",
               disable=not show, leave=False)
    last = time.monotonic()

    def save_partial() -> None:
        from safetensors.torch import save

        blob = save({"acc": acc, "done": done.to(torch.uint8)}, metadata=_partial_meta(cfg))
        atomic_write(checkpoint, lambda f: f.write(blob), binary=True)

    with torch.no_grad():
        for c0 in range(0, len(todo), gp):
            js = torch.tensor(todo[c0:c0 + gp])
            k0 = 0
            while k0 < k_total:  # sample ranges within one noise block
                k1 = min(k0 + kb, k_total, (k0 // _BLOCK + 1) * _BLOCK)
                z, v = _noise(seed, k0, k1, shape, dtype)
                _accumulate(acc, js, t_grid, lam, data[idx[k0:k1]], z, v, eps_fn, sched)
                k0 = k1
            done[js] = True
            bar.update(len(js))
            if checkpoint is not None and time.monotonic() - last > checkpoint_every:
                save_partial()
                last = time.monotonic()
    bar.close()
    if ctx.active:
        acc = distributed.all_reduce_sum(acc)
    means = acc / k_total
    if not bool(torch.isfinite(means).all()):
        raise EMSError(f"compute_ems: the model gave NaN or infinite values or derivatives at "
                       f"{int((~torch.isfinite(means)).any(2).any(1).sum())} grid point(s); "
                       "check the model on [t_end, t_start]")
    l, s, b = statistics_from_moments(means, lam, smoothing)  # noqa: E741
    ems = EMS(lam=lam, l=l.reshape(-1, *shape), s=s.reshape(-1, *shape),
              b=b.reshape(-1, *shape), schedule=sched.name,
              schedule_params=schedule_parameters(sched),
              parameterization=model.parameterization.name, t_start=t0, t_end=t1,
              samples=k_total, guidance_scale=guidance_scale, model=fp, smoothing=smoothing)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return ems


def _read_partial(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        blob = Path(path).read_bytes()
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__") or {}
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise EMSFileError(f"partial EMS file {str(path)!r} is unreadable: {e}") from None
    return tensors, meta


def _noise(seed: int, k0: int, k1: int, shape: tuple[int, ...], dtype: torch.dtype
           ) -> tuple[Tensor, Tensor]:
    """Noise ``z`` and Rademacher probes ``v`` of samples ``k0..k1-1`` (within one block)."""
    block = k0 // _BLOCK
    g = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63))
    z = torch.randn((_BLOCK, *shape), generator=g, dtype=F64)
    v = torch.randint(0, 2, (_BLOCK, *shape), generator=g).to(F64) * 2 - 1
    a, b = k0 - block * _BLOCK, k1 - block * _BLOCK
    return z[a:b].to(dtype), v[a:b].to(dtype)


def _jvp(fn: Callable, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]
         ) -> tuple[Tensor, Tensor]:
    """``torch.func.jvp``; a network with an operation that has no forward-mode derivative
    is a clear :class:`EMSError` rather than a traceback from inside torch."""
    try:
        return torch.func.jvp(fn, primals, tangents)
    except (NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EMSError(
            "compute_ems: the model's network cannot be differentiated in forward mode "
            f"(torch.func.jvp, for the Jacobian diagonal and the derivative along the ODE): "
            f"{first}. Known case: attention through scaled_dot_product_attention on CPU; "
            "use a network without it (diffusers: add_attention=False) or another "
            "attention implementation") from None


def _accumulate(acc: Tensor, js: Tensor, t_grid: Tensor, lam: Tensor, x0: Tensor, z: Tensor,
                v: Tensor, eps_fn: Callable, sched: Schedule) -> None:
    g, k = js.numel(), x0.shape[0]
    dtype = x0.dtype
    t = t_grid[js].repeat_interleave(k)  # (g k,) float64
    la = lam[js].repeat_interleave(k)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    a_, s_ = alpha.to(dtype).view(shape), sigma.to(dtype).view(shape)
    x0r, zr, vr = x0.repeat(g, *[1] * (x0.ndim - 1)), z.repeat(g, *[1] * (z.ndim - 1)), \
        v.repeat(g, *[1] * (v.ndim - 1))
    x = a_ * x0r + s_ * zr
    eps, jv = _jvp(lambda xx: eps_fn(xx, t), (x,), (vr,))
    # Tangent of the ODE in lambda: dx/dlambda = (dlog alpha/dlambda) x - sigma eps.
    dldt = sched.dlambda_dt(t)
    dla = (sched.dlog_alpha_dt(t) / dldt).to(dtype).view(shape)
    dx = dla * x - s_ * eps
    dt = 1.0 / dldt
    _, deps = _jvp(eps_fn, (x, t), (dx, dt))
    rows = [(sigma.view(shape) * (vr * jv).to(F64))]
    ainv = torch.exp(-la).view(shape)
    e = ainv * eps.to(F64)
    y = x.to(F64) / alpha.view(shape)
    q = ainv * (deps.to(F64) - eps.to(F64))
    rows += [e, y, q, e * e, y * y, e * y, e * q, q * y]
    stacked = torch.stack([r.reshape(g, k, -1).sum(1) for r in rows], dim=1)  # (g, 9, D)
    acc.index_add_(0, js, stacked)
