"""diffusers interop, both directions (docs/diffusers.md).

- :func:`model_from_diffusers`: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` and its
  scheduler config as a solverlab :class:`~solverlab.Model`: the discrete DDPM schedule of the
  config as ``vp-discrete`` (step ``n`` at ``t = (n+1)/N``, diffusers' own ``alphas_cumprod``),
  the ``prediction_type`` as a parameterization, the network fed the discrete index ``N t - 1``.
- :class:`SolverlabScheduler`: any registered fixed-grid solverlab solver behind the diffusers
  scheduler API (``set_timesteps``, ``timesteps``, ``step``, ``order``, config round trip), so a
  diffusers pipeline samples with it unchanged.

solverlab solvers call the model themselves; a diffusers loop calls the network and hands the
output to ``step``. The scheduler bridges the two by *replay*: ``step`` re-runs the solver's
current grid interval (``Solver.step``) from its saved state with a denoiser that returns the
outputs delivered so far for this interval, in order, and stops the run at the first model call
it has no output for; that call's ``(x, t)`` is where the network must be evaluated next, so
its ``x`` is the ``prev_sample`` returned and its ``t`` the next entry of ``timesteps``. When
the interval's run completes, the state advances. A solver with ``k`` evaluations per grid
interval (Heun, RK4, PNDM's pseudo Runge-Kutta, singlestep DPM-Solver) therefore takes ``k``
``step`` calls per interval, as diffusers' ``HeunDiscreteScheduler`` does.

A solver that only solves the whole grid in one call (``torchdiffeq-*``: one ``odeint`` over
the grid, so its Adams methods keep their history; no ``Solver.step``) is replayed whole: each
``step`` re-runs ``solve`` from the first sample with every output delivered so far. That costs
the solver's arithmetic (not the network's) quadratically in the number of evaluations, and the
sample between two ``step`` calls must be the ``prev_sample`` returned.

Two assumptions, both true of every first-party solver and checked as the loop runs:

- a step is deterministic in its inputs (re-running it gives the same calls);
- the times a solver evaluates the model at depend only on the grid, not on the model's
  outputs: ``set_timesteps`` finds them by a dry run of the solver with a model that outputs
  zeros, and each call of the real run is checked against it (a mismatch raises
  :class:`~solverlab.SolverlabError`).

Replays run with autograd mode on (nothing requires grad, so no graph is built): solvers then
take their out-of-place paths (:meth:`solverlab.Solver.solve`, ``grad=True``), so a partial run
never changes the saved state in place.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _io
from ..errors import InputError, MissingExtraError, OptionError, SolverlabError
from ..grid import Grid
from ..model import Denoiser, Model, TorchModel
from ..parameterization import PARAMETERIZATIONS, Parameterization
from ..registry import get_grid, get_solver
from ..schedule import F64, VPDiscrete
from ..solver import AdaptiveSolver, Solver, SolverState

try:
    import diffusers
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
except ImportError as _e:  # pragma: no cover - the extra is installed in the test environment
    raise MissingExtraError(
        f"solverlab.integrations.diffusers needs diffusers, which is not installed ({_e}); "
        "install the extra: pip install 'solverlab[diffusers]'") from None

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "SolverlabScheduler",
    "model_from_diffusers",
    "parameterization_from_config",
    "schedule_from_config",
]

#: diffusers' ``prediction_type`` -> solverlab parameterization name.
PREDICTION_TYPES = {"epsilon": "noise", "sample": "data", "v_prediction": "velocity"}
#: The ``beta_schedule`` values diffusers' ``DDPMScheduler`` builds.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_LEARNED = ("learned", "learned_range")


# -- diffusers models in ------------------------------------------------------------------
def _config(config: Any) -> dict[str, Any]:
    """A plain dict of a scheduler config, a scheduler (its ``.config``) or a mapping."""
    if not isinstance(config, Mapping) and isinstance(getattr(config, "config", None), Mapping):
        config = config.config
    if not isinstance(config, Mapping):
        raise OptionError(
            f"scheduler_config={config!r} is not a diffusers scheduler config; pass "
            "scheduler.config (or the scheduler, or a dict with num_train_timesteps, "
            "beta_schedule, prediction_type, ...)")
    return dict(config)


def schedule_from_config(config: Any) -> VPDiscrete:
    """The ``vp-discrete`` schedule of a diffusers scheduler config: diffusers'
    ``DDPMScheduler`` is built from its ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule`` and ``trained_betas`` and its ``alphas_cumprod`` (float32, as every
    diffusers scheduler computes them) become the table, so step ``n`` sits at ``t = (n+1)/N``
    with ``alpha_t^2`` exactly diffusers' value. A zero terminal SNR
    (``rescale_betas_zero_snr``) has ``lambda = -inf`` at ``t = 1`` and is refused."""
    c = _config(config)
    beta_schedule = c.get("beta_schedule", "linear")
    if c.get("trained_betas") is None and beta_schedule not in BETA_SCHEDULES:
        raise OptionError(
            f"scheduler config: beta_schedule={beta_schedule!r} is not allowed; diffusers "
            f"builds {', '.join(repr(b) for b in BETA_SCHEDULES)}, or give trained_betas")
    if c.get("rescale_betas_zero_snr"):
        raise OptionError(
            "scheduler config: rescale_betas_zero_snr=True gives alphas_cumprod = 0 at the last "
            "step (zero terminal SNR, lambda = -inf), which an ODE solver cannot start from; "
            "use a config with rescale_betas_zero_snr=False")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    kwargs = {k: c[k] for k in keys if c.get(k) is not None}
    try:
        ddpm = diffusers.DDPMScheduler(**kwargs)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise OptionError(f"scheduler config {kwargs!r}: diffusers cannot build its betas "
                          f"({e})") from None
    return VPDiscrete(alphas_cumprod=ddpm.alphas_cumprod.to(F64))


def parameterization_from_config(config: Any) -> Parameterization:
    """The parameterization of a config's ``prediction_type`` (:data:`PREDICTION_TYPES`:
    ``epsilon`` -> ``noise``, ``sample`` -> ``data``, ``v_prediction`` -> ``velocity``; the
    same ``v = alpha eps - sigma x0``, Salimans & Ho 2022, eq. 13)."""
    p = _config(config).get("prediction_type", "epsilon")
    if p not in PREDICTION_TYPES:
        raise OptionError(
            f"scheduler config: prediction_type={p!r} is not allowed; choose one of "
            + ", ".join(repr(k) for k in PREDICTION_TYPES))
    return PARAMETERIZATIONS[PREDICTION_TYPES[p]]()


def model_from_diffusers(unet: Any, scheduler_config: Any) -> TorchModel:
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (any module called as
    ``unet(x, timestep, **cond)`` with a ``.config``) as a solverlab model.

    - schedule: :func:`schedule_from_config` (``vp-discrete`` from the config's betas);
    - parameterization: :func:`parameterization_from_config` (the ``prediction_type``);
    - time input: the discrete index ``N t - 1`` (``time_input="index"``), a float: at the
      times of an integer timestep it is that integer;
    - a network that also predicts its variance (``variance_type`` ``learned`` /
      ``learned_range``, or ``out_channels = 2 in_channels``) keeps its first ``in_channels``
      output channels, as diffusers' schedulers do.

    Conditioning (``encoder_hidden_states=...`` of a ``UNet2DConditionModel``) goes through
    :class:`~solverlab.Denoiser` ``cond=``/``uncond=``."""
    if not callable(unet):
        raise OptionError(f"model_from_diffusers: unet={unet!r} is not callable; pass a "
                          "diffusers UNet2DModel or UNet2DConditionModel")
    c = _config(scheduler_config)
    net = getattr(unet, "config", {})
    in_ch, out_ch = getattr(net, "in_channels", None), getattr(net, "out_channels", None)
    keep = None
    if isinstance(in_ch, int) and isinstance(out_ch, int) and out_ch != in_ch and (
            c.get("variance_type") in _LEARNED or out_ch == 2 * in_ch):
        keep = in_ch
    return TorchModel(unet, schedule_from_config(c), parameterization_from_config(c),
                      time_input="index", output_channels=keep)


# -- solverlab solvers out ------------------------------------------------------------------
class _ConfigModel(Model):
    """The schedule and parameterization a scheduler works in; never called (the replay
    denoiser answers every model call)."""

    def __init__(self, schedule: VPDiscrete, parameterization: Parameterization) -> None:
        self.schedule, self.parameterization = schedule, parameterization

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:  # pragma: no cover
        raise SolverlabError("SolverlabScheduler: the model is called by the diffusers loop")

    def __repr__(self) -> str:
        return (f"diffusers model ({self.schedule.name}, "
                f"parameterization={self.parameterization.name!r})")


class _Pending(Exception):
    """A model call the replay has no output for: where the network must be evaluated next."""

    def __init__(self, x: Tensor, t: Tensor) -> None:
        super().__init__("model call without an output")
        self.x, self.t = x, t


class _ReplayDenoiser(Denoiser):
    """Answers the ``k``-th model call of a run with ``answers[k]`` and raises
    :class:`_Pending` at the first call beyond them; with ``record`` it answers zeros and
    records each call's time instead (the dry run of ``set_timesteps``)."""

    def __init__(self, model: Model, record: bool = False) -> None:
        super().__init__(model)
        self.record = record
        self.answers: list[Tensor] = []
        self.calls = 0
        self.times: list[float] = []

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = self.time(x, t)
        if self.record:
            self.times.append(float(t[0]))
            self.nfe += 1
            return torch.zeros_like(x)
        if self.calls < len(self.answers):
            self.calls += 1
            return self.answers[self.calls - 1]
        raise _Pending(x, t)


def _probe_shape(solver: Solver) -> tuple[int, ...]:
    """Sample shape for the dry run: the shape of an EMS the solver (or a wrapped inner solver)
    carries, which checks it; any shape otherwise (the times do not depend on it)."""
    for s in (solver, getattr(solver, "inner_solver", None)):
        shape = getattr(getattr(s, "ems", None), "shape", None)
        if shape is not None:
            return tuple(shape)
    return (1,)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class SolverlabScheduler(SchedulerMixin, ConfigMixin):
    """A registered fixed-grid solverlab solver as a diffusers scheduler.

    ``SolverlabScheduler(solver_name, **options)``: ``options`` are the solver's
    (``solverlab.get_solver(solver_name, **options)``; or ``solver_options={...}``). The rest
    describe the model and the grid, with diffusers' names and defaults:
    ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
    ``prediction_type`` (``epsilon``, ``sample``, ``v_prediction``) and ``variance_type``
    (``learned``/``learned_range``: the network's output has twice the sample's channels and
    the first half is kept); ``grid`` (default ``"linspace"``: diffusers'
    ``timestep_spacing="linspace"``, ending at step 0; any registered grid name) with
    ``grid_options``. ``SolverlabScheduler.from_config(pipe.scheduler.config,
    solver_name=...)`` reads a pipeline's schedule.

    The API: ``set_timesteps(n)`` builds the grid of ``n`` steps (:attr:`grid`, the grid a
    ``solver.solve(model_from_diffusers(unet, scheduler.config), x, scheduler.grid)`` follows)
    and ``timesteps``: one entry per network evaluation, the network's time input ``N t - 1``
    as float32 (integers at grid points of ``linspace``/``leading``/``trailing``; fractional
    at the intermediate times of multi-stage solvers). ``step(model_output, timestep,
    sample).prev_sample`` advances; ``order`` is the number of evaluations per grid interval
    (1 when it varies between intervals, as for PNDM's PLMS warm-up); ``init_noise_sigma`` is
    1 and ``scale_model_input`` returns the sample (VP); ``add_noise`` noises to a timestep.

    A loop visits every entry of ``timesteps`` in order from the first. The ``sample`` given
    to ``step`` at the first evaluation of a grid interval becomes the solver's state (so a
    pipeline may change it between intervals, e.g. inpainting); at an intermediate stage it
    must be the ``prev_sample`` returned. Solvers that need statistics first take them as
    options: ``dpmv3`` needs ``ems=`` (a file path or an :class:`~solverlab.EMS` from
    ``solverlab.compute_ems(model_from_diffusers(unet, config), data)``) or
    ``degenerated=True``. Only JSON options (an EMS as a path) can be saved.

    Solvers that only solve the whole grid in one call (``torchdiffeq-*``) are replayed whole
    (module docstring): the caller may not change the sample between ``step`` calls.

    Not supported: adaptive solvers (they choose their own times), solvers whose evaluation
    times or count depend on the model (``torchdiffeq-implicit_adams`` and ``-fixed_adams``:
    their correctors iterate until they converge; refused with a
    :class:`~solverlab.SolverlabError` where the run departs from the dry run), custom
    ``timesteps=``
    (use ``grid="custom", grid_options={"times": ...}``), gradients through ``step`` (outputs
    are detached).
    """

    config_name = "scheduler_config.json"
    _compatibles: ClassVar[list[Any]] = []
    order = 1

    def __init__(
        self,
        solver_name: str = "dpmpp-2m",
        solver_options: dict[str, Any] | None = None,
        grid: str = "linspace",
        grid_options: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        **options: Any,
    ) -> None:
        for name, value in (("solver_options", solver_options), ("grid_options", grid_options)):
            if value is not None and not isinstance(value, Mapping):
                raise OptionError(f"SolverlabScheduler: option {name}={value!r} is not allowed; "
                                  "give a dict of options or None")
        opts = {**(solver_options or {}), **options}
        self.solver: Solver = get_solver(solver_name, **opts)
        if isinstance(self.solver, AdaptiveSolver):
            raise OptionError(
                f"SolverlabScheduler: solver {solver_name!r} is adaptive (it chooses its own "
                "times from error estimates), but a diffusers loop follows timesteps fixed "
                "before it starts; choose a fixed-grid solver (dpmpp-2m, unipc, heun, ...)")
        self.grid_function: Grid = get_grid(grid, **(grid_options or {}))
        if isinstance(trained_betas, Tensor):
            trained_betas = trained_betas.tolist()
        if variance_type is not None and not isinstance(variance_type, str):
            raise OptionError(f"SolverlabScheduler: option variance_type={variance_type!r} is "
                              "not allowed; give a diffusers variance_type string or None")
        config = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                      beta_end=beta_end, beta_schedule=beta_schedule,
                      trained_betas=trained_betas, prediction_type=prediction_type,
                      variance_type=variance_type)
        self.schedule = schedule_from_config(config)
        self.parameterization = parameterization_from_config(config)
        self.register_to_config(solver_name=solver_name, solver_options=opts, grid=grid,
                                grid_options=dict(grid_options or {}), **config)
        self._model = _ConfigModel(self.schedule, self.parameterization)
        self.init_noise_sigma = 1.0
        self.timesteps: Tensor | None = None
        self.num_inference_steps: int | None = None
        self._grid: Tensor | None = None
        self._times: list[float] = []
        self._times_dtype = F64  # the state dtype of the dry run behind _times
        self._whole = False  # a whole-grid solver, replayed whole (module docstring)
        self._reset()

    # -- the grid ------------------------------------------------------------------------
    def _reset(self) -> None:
        self._state: SolverState | None = None
        self._denoiser: _ReplayDenoiser | None = None
        self._answers: list[Tensor] = []
        self._pending: Tensor | None = None
        self._call = 0
        self._start: Tensor | None = None  # whole-grid replay: the first sample

    @property
    def grid(self) -> Tensor:
        """The solverlab time grid (float64, ``steps + 1`` times) of the last
        :meth:`set_timesteps`."""
        if self._grid is None:
            raise InputError("SolverlabScheduler: no grid yet; call set_timesteps(steps) first")
        return self._grid

    @property
    def nfe(self) -> int:
        """Model outputs delivered to :meth:`step` since :meth:`set_timesteps`."""
        return self._call

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      ) -> None:
        """Build the grid of ``num_inference_steps`` steps and ``timesteps`` (one per network
        evaluation, found by a dry run of the solver on the grid); resets the loop."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(f"SolverlabScheduler.set_timesteps: num_inference_steps={n!r} is "
                              "not allowed; give an int >= 1")
        grid = self.grid_function(self.schedule, n)
        times, counts = self._dry_run(grid, F64)
        if not times:
            raise SolverlabError(f"SolverlabScheduler: solver {self.solver.name!r} made no "
                                 f"model call on a {n}-step grid")
        self._grid, self._times, self._times_dtype = grid, times, F64
        self.num_inference_steps = n
        index = self.schedule.index(torch.tensor(times, dtype=F64))
        self.timesteps = index.to(torch.float32).to(device)
        self.order = counts[0] if len(set(counts)) == 1 and counts[0] > 0 else 1
        self._reset()

    def _dry_run(self, grid: Tensor, dtype: torch.dtype) -> tuple[list[float], list[int]]:
        """The times of the solver's model calls on ``grid`` for a state of ``dtype`` (a model
        that outputs zeros), and the calls per grid interval; sets :attr:`_whole` when the
        solver only solves the whole grid."""
        rec = _ReplayDenoiser(self._model, record=True)
        probe = torch.zeros((1, *_probe_shape(self.solver)), dtype=dtype)
        counts = []
        self._whole = False
        try:
            with torch.enable_grad():  # the path step() takes (module docstring)
                state = self.solver.init(rec, probe, grid)
                while state.index < state.steps:
                    before = len(rec.times)
                    state = self.solver.step(state)
                    counts.append(len(rec.times) - before)
        except NotImplementedError:  # only a whole-grid solve: replayed whole
            self._whole = True
            rec = _ReplayDenoiser(self._model, record=True)
            self.solver.solve(rec, probe, grid, progress=False)
            steps = grid.numel() - 1
            counts = [len(rec.times) // steps] if len(rec.times) % steps == 0 else [0]
        return rec.times, counts

    # -- the loop ------------------------------------------------------------------------
    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """``sample`` unchanged: a VP model takes the state itself."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha x0 + sigma noise`` at the network times ``timesteps`` (one per sample or one
        for all; ``alpha^2 = alphas_cumprod[n]`` at an integer ``n``)."""
        t = self.schedule.t_of_index(torch.as_tensor(timesteps, dtype=F64).cpu())
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        dt = dict(device=original_samples.device, dtype=original_samples.dtype)
        a = self.schedule.alpha(t).reshape(shape).to(**dt)
        s = self.schedule.sigma(t).reshape(shape).to(**dt)
        return a * original_samples + s * noise

    def _output(self, model_output: Any, sample: Tensor) -> Tensor:
        if isinstance(getattr(model_output, "sample", None), Tensor):
            model_output = model_output.sample
        if not isinstance(model_output, Tensor):
            raise InputError(f"SolverlabScheduler.step: model_output is "
                             f"{type(model_output).__name__}; give the network's output tensor")
        if (model_output.ndim >= 2 and model_output.ndim == sample.ndim
                and model_output.shape[1] == 2 * sample.shape[1]
                and self.config.variance_type in _LEARNED):
            model_output = model_output[:, :sample.shape[1]]  # learned variance (diffusers)
        if model_output.shape != sample.shape:
            raise InputError(
                f"SolverlabScheduler.step: model_output of shape {tuple(model_output.shape)} "
                f"does not fit sample of shape {tuple(sample.shape)}; a network that also "
                "predicts its variance needs variance_type='learned' or 'learned_range'")
        return model_output.detach().to(sample.dtype)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor,
             return_dict: bool = True, generator: Any = None, **kwargs: Any,
             ) -> SchedulerOutput | tuple[Tensor]:
        """Deliver the network's output at ``timestep`` (the next entry of ``timesteps``) for
        ``sample``; returns the point of the next evaluation, or the solution after the last
        (``prev_sample``). ``generator`` is ignored: the solvers are deterministic."""
        if self._grid is None:
            raise InputError("SolverlabScheduler.step called before set_timesteps; call "
                             "scheduler.set_timesteps(num_inference_steps) first")
        k = self._call
        if k >= len(self._times):
            raise InputError(
                f"SolverlabScheduler.step: all {len(self._times)} timesteps have been stepped; "
                "call set_timesteps again for a new solve")
        want = float(self.timesteps[k])
        got = float(timestep) if isinstance(timestep, (int, float, Tensor)) and (
            not isinstance(timestep, Tensor) or timestep.numel() == 1) else math.nan
        if not abs(got - want) <= 1e-3 * max(1.0, abs(want)):
            raise InputError(
                f"SolverlabScheduler.step: timestep={timestep!r} is not the expected one; call "
                f"{k + 1} of {len(self._times)} is at timesteps[{k}] = {want:.6g}. A loop "
                "steps through scheduler.timesteps in order, from the first")
        if not isinstance(sample, Tensor) or not sample.is_floating_point():
            raise InputError("SolverlabScheduler.step: sample must be a floating-point tensor")
        out = self._output(model_output, sample)
        sample = sample.detach()
        if k == 0 and sample.dtype != self._times_dtype:
            # a solver may evaluate at times rounded to the state's dtype (torchdiffeq does):
            # the dry run again, in that dtype, so that the replay's checks compare like
            self._times, _ = self._dry_run(self._grid, sample.dtype)
            self._times_dtype = sample.dtype
        if self._whole:
            return self._step_whole(out, sample, return_dict)
        if self._state is None:
            self._denoiser = _ReplayDenoiser(self._model)
            with torch.enable_grad():
                try:
                    self._state = self.solver.init(self._denoiser, sample, self._grid)
                except _Pending:
                    raise SolverlabError(
                        f"SolverlabScheduler: solver {self.solver.name!r} calls the model in "
                        "init, which the step-by-step API cannot serve") from None
        elif not self._answers:
            if sample is not self._state.x:  # a new interval starts from the caller's sample
                self._state = SolverState(
                    denoiser=self._state.denoiser, grid=self._state.grid, x=sample,
                    index=self._state.index, history=self._state.history,
                    cache=self._state.cache)
        else:
            self._check_returned(sample, f"call {k + 1} is an intermediate stage of solver "
                                         f"{self.solver.name!r} (order {self.order})")
        self._answers.append(out)
        self._call += 1
        prev = self._run()
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _run(self) -> Tensor:
        """Replay the current interval with the outputs so far; advance over every interval
        that completes; return the point of the next model call or the final state."""
        den = self._denoiser
        assert den is not None and self._state is not None
        while True:
            den.answers, den.calls = self._answers, 0
            pending = None
            try:
                with torch.enable_grad():
                    new = self.solver.step(self._state)
            except _Pending as p:
                pending = p
            if pending is not None:
                self._check_call(pending.t)
                self._pending = pending.x
                return pending.x
            self._state, self._answers, self._pending = new, [], None
            if new.index >= new.steps:
                self._finished()
                return new.x

    def _step_whole(self, out: Tensor, sample: Tensor, return_dict: bool,
                    ) -> SchedulerOutput | tuple[Tensor]:
        """:meth:`step` for a whole-grid solver: re-run ``solve`` from the first sample with
        every output so far (module docstring)."""
        if self._start is None:
            self._start = sample
        else:
            self._check_returned(sample, f"solver {self.solver.name!r} solves the whole grid "
                                         f"in one call, so call {self._call + 1} continues it")
        self._answers.append(out)
        self._call += 1
        den = _ReplayDenoiser(self._model)
        den.answers = self._answers
        pending = None
        try:
            prev = self.solver.solve(den, self._start, self._grid, progress=False).x
        except _Pending as p:
            pending = p
        if pending is None:
            self._finished()
        else:
            self._check_call(pending.t)
            self._pending = prev = pending.x
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _check_returned(self, sample: Tensor, why: str) -> None:
        """``sample`` is the ``prev_sample`` the previous :meth:`step` returned."""
        if sample is not self._pending and not torch.equal(sample, self._pending):
            raise InputError(f"SolverlabScheduler.step: {why}; its sample must be the "
                             "prev_sample the previous step returned, unchanged")

    def _check_call(self, t: Tensor) -> None:
        """The pending model call is at the time the dry run found for it."""
        k = self._call
        want = self._times[k] if k < len(self._times) else math.nan
        got = float(t[0])
        if not abs(got - want) <= 1e-9 * max(1.0, abs(want)):
            raise SolverlabError(
                f"SolverlabScheduler: solver {self.solver.name!r} asks for the model "
                f"at t={got!r} on call {k + 1}, but its dry run on this grid asked at "
                f"t={want!r}: its evaluation times depend on the model, which the "
                "diffusers API (timesteps fixed in advance) cannot follow")

    def _finished(self) -> None:
        if self._call != len(self._times):
            raise SolverlabError(
                f"SolverlabScheduler: solver {self.solver.name!r} finished after "
                f"{self._call} model calls, its dry run took {len(self._times)}: its "
                "number of evaluations depends on the model, which the diffusers API "
                "(timesteps fixed in advance) cannot follow")

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False,
                        **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` (``scheduler_config.json``, written atomically);
        refuses options that are not JSON values (an EMS object: save it and pass its path)."""
        for key in ("solver_options", "grid_options"):
            for name, value in self.config[key].items():
                if not _jsonable(value):
                    raise OptionError(
                        f"SolverlabScheduler.save_pretrained: option {name}={value!r} is not a "
                        "JSON value and cannot be saved in scheduler_config.json; pass it as "
                        "a file path (an EMS: ems.save(path), then ems=path)")
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_json_file(self, json_file_path: str | os.PathLike[str]) -> None:
        _io.write_text(json_file_path, self.to_json_string())

    def __len__(self) -> int:
        return self.config.num_train_timesteps
