"""The frontier: solverlab's best configuration against the best configuration any peer offers
its users, at 5-20 NFE on Gaussian mixtures (issue 13, items 4-6).

    python bench/frontier.py [--quick] [--out bench]

Problems: two 16-dimensional mixtures of 6 Gaussians (``GaussianMixtureData.random(16, 6,
seed=s, var_min=.., var_max=..)``: ``narrow`` seed 0, component variances 1e-2..0.25; ``wide``
seed 1, 5e-2..0.5) on the diffusers default discrete schedule (DDPM linear betas 1e-4..0.02,
N = 1000; ``vp-discrete``). 256 start states from the exact marginal at ``t = 1`` (evaluation
seed 0); references: float64 dopri8 (``solverlab.reference.reference_solution``, rtol = atol =
1e-10) to ``t = 1/N`` (training step 0) and, for configurations that end at ``sigma = 0``,
continued from there to ``sigma = 0`` (classical RK4 in ``sigma = sigma_t/alpha_t``, which the
flow of a mixture with non-degenerate components crosses smoothly). Error: the **median over
samples of the per-sample RMS error** ``sqrt(mean_d (x_d - ref_d)^2)`` at the configuration's
end point (``t = 1/N``, or ``sigma = 0``, or wherever a peer's option puts it).

Every configuration spends exactly the NFE budget (5, 6, 8, 10, 15, 20), counted at the model;
one that cannot hit a budget exactly is skipped there.

Peers (run here, on the same problems and start states):

- **diffusers** (installed version): every ODE scheduler of the DDPM family with the cross
  product of its options (``timestep_spacing``, Karras/exponential/beta sigmas,
  ``use_lu_lambdas``, orders, ``solver_type``, ``lower_order_final``, ``euler_at_final``,
  ``final_sigmas_type``, ...), float32 as shipped, driven as a pipeline does
  (``init_noise_sigma``, ``scale_model_input``, ``step``);
- **k-diffusion** (``k_diffusion.sampling``, its real ``sample_*`` functions): the
  deterministic samplers (ancestral/SDE ones with ``eta = 0``) on its sigma grids (Karras
  with rho 3/5/7/9, exponential, polyexponential, VP), ending at ``sigma = 0`` (its grids'
  appended zero) or at ``sigma_min``; ``sample_dpm_fast`` on its own grid;
- **official** DPM-Solver / UniPC formulas as ``solverlab_expint`` reproduces them (official
  ``lower_order_final``, ``official_d2``, lower-order warm-up, UniPC's order-2 shortcut;
  ``denoise_to_zero``; the official singlestep order allocation as a chain of fixed-r steps) on
  their ``skip_type``s ``logSNR``, ``time_uniform``, ``time_quadratic``.

solverlab: every solver x options x grid (the peers' grids included), plus what no peer has:
``dpmv3`` with EMS and ``teleport`` (Gaussian jump, Wang & Vastola 2024) whose fits use only
1024 training samples drawn with seed 1 (never the evaluation batch or its references).

Writes ``frontier.md``, ``frontier.png`` and ``frontier.json`` (the best solverlab
configuration per problem and NFE, and the presets chosen from a second pass over every budget
5..20) into ``--out``, atomically. About 20 minutes on one thread; ``--quick`` (64 samples,
NFE 5 and 10, fewer options): about 2-3 minutes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.util
import itertools
import math
import platform
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

import solverlab
from solverlab import _io, presets
from solverlab.analytic import AnalyticModel, GaussianMixtureData
from solverlab.errors import SolverlabError
from solverlab.reference import reference_solution
from solverlab.schedule import VPDiscrete

HERE = Path(__file__).resolve().parent
F64 = torch.float64
NFE = (5, 6, 8, 10, 15, 20)
GOAL_NFE = (5, 6, 8, 10)
QUICK_NFE = (5, 10)
GOAL_RATIO = 0.5
EVAL_SEED, TRAIN_SEED, TRAIN_SAMPLES = 0, 1, 1024
#: solverlab configurations kept per (problem, NFE) for the preset pass over every budget.
SHORTLIST = 12
#: diffusers' default training schedule (DDPM): every scheduler gets it explicitly, since
#: some classes default to Stable Diffusion's betas.
BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
         "beta_schedule": "linear"}
T_MIN = "t=1/N"
ZERO = "sigma=0"


# -- problems and references -------------------------------------------------------------------
@attrs.frozen
class Problem:
    name: str
    description: str
    model: AnalyticModel
    x: Tensor  # start states at t = 1 (the evaluation batch)
    train: Tensor  # training samples (teleport fit, EMS)
    refs: dict[str, Tensor]  # end label -> reference (t=1/N, sigma=0, t=...)


PROBLEMS = (("narrow", 0, 1e-2, 0.25), ("wide", 1, 5e-2, 0.5))


def make_problem(name: str, seed: int, var_min: float, var_max: float, samples: int
                 ) -> Problem:
    data = GaussianMixtureData.random(16, 6, seed=seed, var_min=var_min, var_max=var_max)
    model = AnalyticModel(data=data, schedule=VPDiscrete())
    x = model.sample_prior(samples, t=1.0, generator=torch.Generator().manual_seed(EVAL_SEED),
                           dtype=F64)
    train = data.sample(TRAIN_SAMPLES, generator=torch.Generator().manual_seed(TRAIN_SEED))
    sch = model.schedule
    ref = reference_solution(model, x, 1.0, sch.t_min)
    zero = to_sigma_zero(model, ref, float(sch.sigma_ve(torch.tensor(sch.t_min, dtype=F64))))
    return Problem(name, f"dim 16, 6 components, variances {var_min:g}..{var_max:g}, seed {seed}",
                   model, x, train, {T_MIN: ref, ZERO: zero})


def to_sigma_zero(model: AnalyticModel, x: Tensor, sigma: float, steps: int = 256) -> Tensor:
    """``x`` at noise level ``sigma`` (VP state) carried along the flow to ``sigma = 0``:
    ``dy/dsigma = -sigma score(y; sigma)`` for ``y = x/alpha`` (EDM form), classical RK4 with
    ``steps`` steps (the change from 256 to 512 steps is below 1e-12)."""
    y = x * math.sqrt(1.0 + sigma**2)

    def f(y: Tensor, s: float) -> Tensor:
        return -s * model.data.score(y, 1.0, s)

    h = -sigma / steps
    s = sigma
    for _ in range(steps):
        k1 = f(y, s)
        k2 = f(y + 0.5 * h * k1, s + 0.5 * h)
        k3 = f(y + 0.5 * h * k2, s + 0.5 * h)
        k4 = f(y + h * k3, s + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        s = s + h
    return y


def reference_at(problem: Problem, end: str) -> Tensor:
    """The reference at ``end`` (``t=1/N``, ``sigma=0`` or ``t=<float>``), cached."""
    if end not in problem.refs:
        t_end = float(end.removeprefix("t="))
        problem.refs[end] = reference_solution(problem.model, problem.x, 1.0, t_end)
    return problem.refs[end]


def end_of_sigma(problem: Problem, sigma: float) -> str:
    """The end label of a state at noise level ``sigma = sigma_t/alpha_t``."""
    if sigma <= 0.0:
        return ZERO
    sch = problem.model.schedule
    s_min = float(sch.sigma_ve(torch.tensor(sch.t_min, dtype=F64)))
    if abs(sigma / s_min - 1) < 1e-4:
        return T_MIN
    t = float(sch.t_of_lambda(torch.tensor(-math.log(sigma), dtype=F64)))
    return f"t={t:.6f}"


def median_rms(x: Tensor, ref: Tensor) -> float:
    """The median over samples of ``sqrt(mean_d (x_d - ref_d)^2)``; ``inf`` if not finite."""
    d = (x.to(F64).reshape(ref.shape) - ref).pow(2).mean(dim=1).sqrt()
    return float(d.median()) if bool(torch.isfinite(d).all()) else math.inf


# -- results -----------------------------------------------------------------------------------
@attrs.frozen
class Result:
    family: str  # "diffusers", "k-diffusion", "official", "solverlab"
    label: str
    problem: str
    nfe: int
    error: float
    end: str = T_MIN
    config: dict[str, Any] | None = None  # solverlab: the Config as a dict
    key: str = ""  # a configuration's identity across problems and budgets


class Tally:
    """Counts of configurations run, skipped (budget not reachable), failed."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, family: str, what: str) -> None:
        d = self.counts.setdefault(family, {"run": 0, "skipped": 0, "failed": 0,
                                            "refused": 0})
        d[what] += 1


# -- diffusers ---------------------------------------------------------------------------------
def _axes(quick: bool, **axes: tuple[list, list]) -> Iterator[dict[str, Any]]:
    names = list(axes)
    values = [v[1] if quick else v[0] for v in axes.values()]
    for combo in itertools.product(*values):
        yield dict(zip(names, combo))


def _merge(*ds: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in ds:
        out.update(d)
    return out


SPACINGS = {"linspace": {"timestep_spacing": "linspace"},
            "leading": {"timestep_spacing": "leading"},
            "leading+1": {"timestep_spacing": "leading", "steps_offset": 1},
            "trailing": {"timestep_spacing": "trailing"}}
SIGMA_OPTS = {"default": {}, "karras": {"use_karras_sigmas": True},
              "exponential": {"use_exponential_sigmas": True},
              "beta": {"use_beta_sigmas": True}, "lu": {"use_lu_lambdas": True}}


def _spacing_sigmas(quick: bool, lu: bool) -> dict[str, tuple[list, list]]:
    sig = [k for k in SIGMA_OPTS if lu or k != "lu"]
    return {"spacing": (list(SPACINGS), ["linspace", "trailing"]),
            "sigmas": (sig, ["default", "karras", "exponential"])}


def diffusers_configs(quick: bool) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(class name, label, constructor options, step options)."""
    out: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []

    def add(cls: str, axes: Iterable[dict[str, Any]], build: Callable[[dict], dict],
            step: Callable[[dict], dict] = lambda a: {}) -> None:
        for a in axes:
            label = cls.removesuffix("Scheduler") + "(" + ", ".join(
                f"{k}={v}" for k, v in a.items()) + ")"
            out.append((cls, label, _merge(BETAS, build(a)), step(a)))

    def spaced(a: dict) -> dict:
        return _merge(SPACINGS[a["spacing"]], SIGMA_OPTS[a["sigmas"]])

    ss = _spacing_sigmas(quick, lu=True)
    add("DPMSolverMultistepScheduler", _axes(
        quick, algorithm_type=(["dpmsolver++", "dpmsolver"], ["dpmsolver++", "dpmsolver"]),
        solver_order=([1, 2, 3], [2, 3]), solver_type=(["midpoint", "heun"], ["midpoint"]),
        lower_order_final=([True, False], [True]), euler_at_final=([False, True], [False]),
        final_sigmas_type=(["zero", "sigma_min"], ["zero", "sigma_min"]), **ss),
        lambda a: _merge({k: a[k] for k in ("algorithm_type", "solver_order", "solver_type",
                                            "lower_order_final", "euler_at_final",
                                            "final_sigmas_type")}, spaced(a)))
    sig_only = {"sigmas": ([k for k in SIGMA_OPTS if k != "lu"], ["default", "karras"])}
    add("DPMSolverSinglestepScheduler", _axes(
        quick, algorithm_type=(["dpmsolver++", "dpmsolver"], ["dpmsolver++"]),
        solver_order=([1, 2, 3], [2, 3]), solver_type=(["midpoint", "heun"], ["midpoint"]),
        lower_order_final=([True, False], [True]),
        final_sigmas_type=(["zero", "sigma_min"], ["sigma_min"]), **sig_only),
        lambda a: _merge({k: a[k] for k in ("algorithm_type", "solver_order", "solver_type",
                                            "lower_order_final", "final_sigmas_type")},
                         SIGMA_OPTS[a["sigmas"]]))
    ss = _spacing_sigmas(quick, lu=False)
    add("UniPCMultistepScheduler", _axes(
        quick, solver_order=([1, 2, 3], [2, 3]), solver_type=(["bh1", "bh2"], ["bh1", "bh2"]),
        predict_x0=([True, False], [True]), lower_order_final=([True, False], [True]),
        corrector=(["on", "off"], ["on"]),
        final_sigmas_type=(["zero", "sigma_min"], ["sigma_min"]), **ss),
        lambda a: _merge({k: a[k] for k in ("solver_order", "solver_type", "predict_x0",
                                            "lower_order_final", "final_sigmas_type")},
                         {"disable_corrector": [] if a["corrector"] == "on"
                          else list(range(1000))}, spaced(a)))
    add("DEISMultistepScheduler", _axes(
        quick, solver_order=([1, 2, 3], [2, 3]), lower_order_final=([True, False], [True]),
        **ss),
        lambda a: _merge({k: a[k] for k in ("solver_order", "lower_order_final")}, spaced(a)))
    add("SASolverScheduler", _axes(
        quick, predictor_order=([1, 2, 3], [2]), corrector_order=([1, 2, 3], [2]),
        algorithm_type=(["data_prediction", "noise_prediction"], ["data_prediction"]),
        lower_order_final=([True, False], [True]), **ss),
        lambda a: _merge({k: a[k] for k in ("predictor_order", "corrector_order",
                                            "algorithm_type", "lower_order_final")},
                         {"tau_func": _no_noise}, spaced(a)))
    spacing = {"spacing": (list(SPACINGS), ["linspace", "trailing"])}
    add("DDIMScheduler", _axes(quick, set_alpha_to_one=([False, True], [False]), **spacing),
        lambda a: _merge({"set_alpha_to_one": a["set_alpha_to_one"], "clip_sample": False},
                         SPACINGS[a["spacing"]]))
    add("PNDMScheduler", _axes(quick, skip_prk_steps=([False, True], [False, True]),
                               set_alpha_to_one=([False, True], [False]), **spacing),
        lambda a: _merge({k: a[k] for k in ("skip_prk_steps", "set_alpha_to_one")},
                         SPACINGS[a["spacing"]]))
    add("EulerDiscreteScheduler", _axes(
        quick, final_sigmas_type=(["zero", "sigma_min"], ["zero"]),
        interpolation_type=(["linear", "log_linear"], ["linear"]),
        timestep_type=(["discrete", "continuous"], ["discrete"]), **ss),
        lambda a: _merge({k: a[k] for k in ("final_sigmas_type", "interpolation_type",
                                            "timestep_type")}, spaced(a)))
    for cls in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler"):
        add(cls, _axes(quick, **ss), spaced)
    add("LMSDiscreteScheduler", _axes(quick, order=([1, 2, 3, 4], [4]), **ss), spaced,
        lambda a: {"order": a["order"]})
    return out


def _no_noise(t: Any) -> float:
    """SA-Solver's ``tau_func`` for the probability-flow ODE (no stochasticity)."""
    return 0.0


def run_diffusers(problem: Problem, budgets: tuple[int, ...], quick: bool, tally: Tally
                  ) -> list[Result]:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    model, sch = problem.model, problem.model.schedule
    x32 = problem.x.to(torch.float32)
    results = []
    templates: dict[str, Any] = {}
    for cls_name, label, kwargs, step_kw in diffusers_configs(quick):
        key = repr((cls_name, sorted((k, repr(v)) for k, v in kwargs.items()), step_kw))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation notes of algorithm_type
                template = templates.get(key) or getattr(diffusers, cls_name)(**kwargs)
            templates[key] = template
        except (ValueError, NotImplementedError, TypeError):  # a combination it refuses
            for _ in budgets:
                tally.add("diffusers", "refused")
            continue
        for budget in budgets:
            sched = _diffusers_for_budget(template, budget)
            if sched is None:
                tally.add("diffusers", "skipped")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sample, end_sigma = _drive(sched, model, sch, x32, step_kw)
            except (ValueError, IndexError, RuntimeError, ZeroDivisionError) as e:
                tally.add("diffusers", "failed")
                results.append(Result("diffusers", label, problem.name, budget, math.inf,
                                      f"failed: {type(e).__name__}", key=label))
                continue
            end = end_of_sigma(problem, end_sigma)
            x_vp = sample.to(F64) / math.sqrt(1.0 + end_sigma**2) if _ve_sample(sched) \
                else sample.to(F64)
            err = median_rms(x_vp, reference_at(problem, end))
            tally.add("diffusers", "run" if math.isfinite(err) else "failed")
            results.append(Result("diffusers", label, problem.name, budget, err, end,
                                  key=label))
    return results


def _ve_sample(sched: Any) -> bool:
    """Whether the scheduler keeps ``x/alpha`` (k-diffusion style: Euler, Heun, LMS, KDPM2)."""
    return type(sched).__name__ in ("EulerDiscreteScheduler", "HeunDiscreteScheduler",
                                    "LMSDiscreteScheduler", "KDPM2DiscreteScheduler")


def _diffusers_for_budget(template: Any, budget: int) -> Any:
    """A fresh copy of ``template`` after ``set_timesteps(n)`` with ``len(timesteps) ==
    budget`` (one model call per timestep, as a pipeline loop makes), or ``None``."""
    for n in range(budget, 0, -1):
        sched = copy.deepcopy(template)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched.set_timesteps(n)
        except (ValueError, IndexError, RuntimeError):
            continue
        if len(sched.timesteps) == budget:
            return sched
        if len(sched.timesteps) < budget:
            return None
    return None


def _drive(sched: Any, model: AnalyticModel, sch: VPDiscrete, x: Tensor,
           step_kw: dict[str, Any]) -> tuple[Tensor, float]:
    """The pipeline loop: ``(final sample, its noise level sigma_t/alpha_t)``."""
    sample = x * sched.init_noise_sigma
    b = x.shape[0]
    for n in sched.timesteps:
        inp = sched.scale_model_input(sample, n)
        t = sch.t_of_index(torch.full((b,), float(n), dtype=F64))
        eps = model(inp, t)
        sample = sched.step(eps, n, sample, **step_kw).prev_sample
    if hasattr(sched, "sigmas") and sched.sigmas is not None and not isinstance(
            sched, _ddim_like()):
        end = float(sched.sigmas[-1])
    else:
        a = float(sched.final_alpha_cumprod)
        end = math.sqrt(max(1.0 - a, 0.0) / a)
    return sample, end


def _ddim_like() -> tuple[type, ...]:
    import diffusers

    return (diffusers.DDIMScheduler, diffusers.PNDMScheduler)


# -- k-diffusion -------------------------------------------------------------------------------
def load_k_diffusion() -> Any:
    """``k_diffusion.sampling`` (the installed distribution's real module). Its package
    ``__init__`` imports training code (torchvision, CLIP, ...); only ``sampling`` and the
    ``utils`` it imports are loaded, with a stand-in for ``torchvision.transforms.functional``
    (used by ``utils``' image helpers only) when torchvision is absent."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("k-diffusion is not installed: pip install --no-deps k-diffusion "
                         "torchsde trampoline (bench/frontier.py uses k_diffusion.sampling)")
    if "k_diffusion" not in sys.modules:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    stubs = []
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
            stubs.append(name)
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


#: (label, sampler, extra kwargs, evaluations per step, one fewer on a step to sigma = 0).
K_SAMPLERS: tuple[tuple[str, str, dict[str, Any], int, bool], ...] = (
    ("euler", "sample_euler", {}, 1, False),
    ("heun", "sample_heun", {}, 2, True),
    ("dpm_2", "sample_dpm_2", {}, 2, True),
    ("dpm_2_ancestral eta=0", "sample_dpm_2_ancestral", {"eta": 0.0}, 2, True),
    ("lms order=1", "sample_lms", {"order": 1}, 1, False),
    ("lms order=2", "sample_lms", {"order": 2}, 1, False),
    ("lms order=3", "sample_lms", {"order": 3}, 1, False),
    ("lms order=4", "sample_lms", {"order": 4}, 1, False),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, 1, False),
    ("dpmpp_2s_ancestral eta=0", "sample_dpmpp_2s_ancestral", {"eta": 0.0}, 2, True),
    ("dpmpp_sde eta=0", "sample_dpmpp_sde", {"eta": 0.0}, 2, True),
    ("dpmpp_2m_sde eta=0 midpoint", "sample_dpmpp_2m_sde",
     {"eta": 0.0, "solver_type": "midpoint"}, 1, False),
    ("dpmpp_2m_sde eta=0 heun", "sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"},
     1, False),
    ("dpmpp_3m_sde eta=0", "sample_dpmpp_3m_sde", {"eta": 0.0}, 1, False),
)


def k_grids(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, get_sigmas function, kwargs without n/sigma_min/sigma_max)."""
    rhos = [7.0] if quick else [3.0, 5.0, 7.0, 9.0]
    grids = [(f"karras rho={r:g}", "get_sigmas_karras", {"rho": r}) for r in rhos]
    grids.append(("exponential", "get_sigmas_exponential", {}))
    if not quick:
        grids += [(f"polyexponential rho={r:g}", "get_sigmas_polyexponential", {"rho": r})
                  for r in (0.5, 2.0, 3.0)]
        grids.append(("vp", "get_sigmas_vp", {}))
    return grids


class KDenoiser:
    """k-diffusion's model interface ``denoised = model(x, sigma)`` (``x = x0 + sigma eps``)
    around the analytic model on its discrete schedule, counting evaluations."""

    def __init__(self, model: AnalyticModel) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        self.calls += 1
        s = float(sigma.reshape(-1)[0])
        sch = self.model.schedule
        t = sch.t_of_lambda(torch.tensor(-math.log(s), dtype=F64)).expand(x.shape[0])
        eps = self.model(x / math.sqrt(1.0 + s * s), t)
        return x - s * eps


def run_k_diffusion(problem: Problem, budgets: tuple[int, ...], quick: bool, tally: Tally
                    ) -> list[Result]:
    kd = load_k_diffusion()
    sch = problem.model.schedule
    s_max = float(sch.sigma_ve(torch.tensor(sch.t_max, dtype=F64)))
    s_min = float(sch.sigma_ve(torch.tensor(sch.t_min, dtype=F64)))
    results = []

    def finish(label: str, budget: int, fn: Callable[[KDenoiser], Tensor]) -> None:
        den = KDenoiser(problem.model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out, end_sigma = fn(den)
        except (ValueError, RuntimeError, ZeroDivisionError):
            tally.add("k-diffusion", "failed")
            return
        if den.calls != budget:
            tally.add("k-diffusion", "skipped")
            return
        end = end_of_sigma(problem, end_sigma)
        err = median_rms(out.to(F64) / math.sqrt(1.0 + end_sigma**2),
                         reference_at(problem, end))
        tally.add("k-diffusion", "run" if math.isfinite(err) else "failed")
        results.append(Result("k-diffusion", label, problem.name, budget, err, end, key=label))

    for (slabel, fname, kw, cost, cheaper_last), (glabel, gname, gkw) in itertools.product(
            K_SAMPLERS, k_grids(quick)):
        for zero_end, budget in itertools.product((True, False), budgets):
            steps = next((s for s in range(1, budget + 1)
                          if cost * s - (cheaper_last and zero_end) == budget), None)
            label = f"{slabel} on {glabel}" + (", to sigma=0" if zero_end else ", to sigma_min")
            if steps is None:
                tally.add("k-diffusion", "skipped")
                continue
            if gname == "get_sigmas_vp":
                sig = getattr(kd, gname)(steps + 1, **gkw)
            else:
                sig = getattr(kd, gname)(steps + 1, s_min, s_max, **gkw)
            sig = sig.to(F64) if zero_end else sig[:-1].to(F64)

            def go(den: KDenoiser, sig=sig, fname=fname, kw=kw) -> tuple[Tensor, float]:
                x = problem.x * float(sig[0])
                return getattr(kd, fname)(den, x, sig, disable=True, **kw), float(sig[-1])

            finish(label, budget, go)
    for budget in budgets:  # DPM-Solver-fast on its own grid (log-uniform in sigma)
        def fast(den: KDenoiser, budget=budget) -> tuple[Tensor, float]:
            return kd.sample_dpm_fast(den, problem.x * s_max, s_min, s_max, budget, eta=0.0,
                                      disable=True), s_min

        finish("dpm_fast eta=0 (own grid)", budget, fast)
    return results


# -- official DPM-Solver / UniPC (as solverlab_expint reproduces them) -------------------------
SKIP_TYPES = {"logSNR": "logsnr", "time_uniform": "time-uniform",
              "time_quadratic": "time-quadratic"}


def official_configs(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, solver, options) of the official codes' settings."""
    out = []
    off = {"lower_order_final": "official"}
    finals = [{}, {"final_step": "denoise_to_zero"}]
    lofs = [off, {"lower_order_final": False}]
    for model_type, names in (("noise", ("ddim", "dpm-solver-2m", "dpm-solver-3m")),
                              ("data", ("ddim", "dpmpp-2m", "dpmpp-3m"))):
        for order, name in enumerate(names, start=1):
            for st, lof, fin in itertools.product(("dpmsolver", "taylor"), lofs, finals):
                if order == 1 and (st == "taylor" or lof is not off):
                    continue
                opts = {**lof, **fin}
                if order > 1:
                    opts["solver_type"] = st
                if order == 3:
                    opts.update(official_d2=True, warmup="lower-order")
                label = (f"DPM-Solver multistep ({model_type}) order {order} {st} "
                         f"{_fmt_opts(opts)}")
                out.append((label, name, opts))
    # singlestep_fixed: every step of the same order, r1 = 1/2 (order 2), 1/3, 2/3 (order 3)
    for name, opts in (("dpm-solver-2", {}), ("dpm-solver-3", {}), ("dpmpp-2s", {}),
                       ("dpmpp-3s", {})):
        for st in ("dpmsolver", "taylor"):
            o = {**opts, "solver_type": st, "lower_order_final": False}
            out.append((f"DPM-Solver singlestep_fixed {name} {st}", name, o))
    for order, variant, predict, lof, fin in itertools.product(
            (1, 2, 3), ("bh1", "bh2"), ("data", "noise"), lofs, finals):
        opts = {"predictor_order": order, "variant": variant, "predict": predict,
                "diffusers_order2_shortcut": True, **lof, **fin}
        out.append((f"UniPC {variant} order {order} {predict} {_fmt_opts(lof)} "
                    f"{_fmt_opts(fin)}", "unipc", opts))
    for predict in ("data", "noise"):  # vary_coeff: at order 1 UniC-1 with its exact rho
        out.append((f"UniPC vary_coeff order 1 {predict}", "unipc",
                    {"predictor_order": 1, "predict": predict, "lower_order_final": "official"}))
    if quick:
        out = [c for c in out if "denoise_to_zero" not in repr(c[2])]
    return out


def _fmt_opts(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def official_singlestep_orders(steps: int, order: int) -> list[int]:
    """The official ``get_orders_and_timesteps_for_singlestep_solver`` allocation."""
    if order == 3:
        k = steps // 3 + 1
        return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[
            steps % 3]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def run_official_singlestep(problem: Problem, budget: int, order: int, prediction: str,
                            solver_type: str, skip: str) -> tuple[Tensor, int]:
    """Official ``method="singlestep"`` (DPM-Solver-fast): outer steps of the allocated orders,
    each a fixed-r singlestep update (r = 1/2 or 1/3, 2/3 in lambda); outer times uniform in
    lambda (``logSNR``) or picked from the ``skip`` grid of ``budget`` steps at the cumulative
    orders. Chained solverlab solves, one per run of equal orders."""
    sch = problem.model.schedule
    orders = official_singlestep_orders(budget, order)
    rule = solverlab.get_grid(SKIP_TYPES[skip])
    if skip == "logSNR":
        outer = rule(sch, len(orders))
    else:
        fine = rule(sch, budget)
        outer = fine[torch.tensor([0, *itertools.accumulate(orders)])]
    names = {("noise", 1): "ddim", ("noise", 2): "dpm-solver-2", ("noise", 3): "dpm-solver-3",
             ("data", 1): "ddim", ("data", 2): "dpmpp-2s", ("data", 3): "dpmpp-3s"}
    x, nfe, i = problem.x, 0, 0
    for k, run in itertools.groupby(orders):
        n = len(list(run))
        opts = {} if k == 1 else {"solver_type": solver_type, "lower_order_final": False}
        sol = solverlab.get_solver(names[prediction, k], **opts).solve(
            problem.model, x, outer[i:i + n + 1], progress=False)
        x, nfe, i = sol.x, nfe + sol.nfe, i + n
    return x, nfe


def run_official(problem: Problem, budgets: tuple[int, ...], quick: bool, tally: Tally
                 ) -> list[Result]:
    results = []
    for (label, name, opts), skip in itertools.product(official_configs(quick), SKIP_TYPES):
        solver = solverlab.get_solver(name, **opts)
        for budget in budgets:
            r = _solve(problem, solver, solverlab.get_grid(SKIP_TYPES[skip]), budget)
            full = f"{label} skip_type={skip}"
            if r is None:
                tally.add("official", "skipped")
                continue
            err, end = r
            tally.add("official", "run" if math.isfinite(err) else "failed")
            results.append(Result("official", full, problem.name, budget, err, end, key=full))
    for order, pred, st, skip in itertools.product((2, 3), ("noise", "data"),
                                                   ("dpmsolver", "taylor"), SKIP_TYPES):
        label = (f"DPM-Solver singlestep ({pred}) order {order} {st} skip_type={skip}")
        for budget in budgets:
            try:
                x, nfe = run_official_singlestep(problem, budget, order, pred, st, skip)
            except SolverlabError:
                tally.add("official", "failed")
                continue
            assert nfe == budget, (label, nfe, budget)
            err = median_rms(x, problem.refs[T_MIN])
            tally.add("official", "run" if math.isfinite(err) else "failed")
            results.append(Result("official", label, problem.name, budget, err, key=label))
    return results


# -- solverlab ---------------------------------------------------------------------------------
def _product(name: str, **axes: list) -> list[tuple[str, dict[str, Any]]]:
    keys = list(axes)
    return [(name, dict(zip(keys, v))) for v in itertools.product(*axes.values())]


LOF5 = ["auto", True, False, "official", "diffusers"]


def solverlab_solvers(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """Every solver x option set of the sweep (``solver``, ``options``); ``dpmv3`` and teleport
    configurations are listed by name and built with the problem's training data."""
    st = ["dpmsolver", "taylor"]
    if quick:
        out = [("ddim", {})]
        out += _product("dpmpp-2m", lower_order_final=["auto", "official"])
        out += _product("dpm-solver-2m", lower_order_final=["auto", "official"])
        out += _product("dpmpp-3m", official_d2=[False, True], warmup=["corrected"])
        out += _product("dpm-solver-3m", official_d2=[False, True])
        out += _product("unipc", predictor_order=[1, 2, 3], diffusers_order2_shortcut=[False])
        out += _product("deis", order=[2, 3])
        out += [("dpm-solver-3", {}), ("dpm-solver-fast", {})]
        out += _product("dpmv3", predictor_pseudo=[False, True])
    else:
        out = [("ddim", {})]
        for name in ("dpmpp-2m", "dpm-solver-2m"):
            out += _product(name, solver_type=st, lower_order_final=LOF5)
        for name in ("dpmpp-3m", "dpm-solver-3m"):
            out += _product(name, solver_type=st, lower_order_final=LOF5,
                            warmup=["corrected", "lower-order"], official_d2=[False, True])
        out += [("deis", {"order": 1})]
        out += _product("deis", order=[2], interpolation=["log-rho", "rho"],
                        lower_order_final=["auto", True, False, "diffusers"])
        out += _product("deis", order=[3], interpolation=["log-rho", "rho"],
                        lower_order_final=["auto", True, False, "diffusers"],
                        warmup=["corrected", "lower-order"])
        out += _product("unipc", predictor_order=[1, 2, 3], variant=["bh1", "bh2"],
                        predict=["data", "noise"], corrector=[True, False],
                        diffusers_order2_shortcut=[False, True],
                        lower_order_final=["auto", True, False, "official"])
        for name in ("dpm-solver-2", "dpmpp-2s", "dpm-solver-3", "dpmpp-3s"):
            out += _product(name, solver_type=st, substeps=["fixed-r", "grid"],
                            lower_order_final=[True, False])
        out += _product("dpm-solver-fast", order=[2, 3], solver_type=st,
                        lower_order_final_threshold=[15, None])
        out += _product("pndm-plms", midpoint=["sigma", "time"], warmup=["prk", "diffusers"],
                        weights=["fixed", "variable"])
        out += _product("pndm-f", midpoint=["sigma", "time"], weights=["fixed", "variable"])
        out += [("pndm-s", {}), *_product("pndm-prk", midpoint=["sigma", "time", "lambda"])]
        for name in ("euler", "heun", "rk4"):
            out += _product(name, variable=["sigma", "lambda", "log_sigma", "t"])
        for m in ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams"):
            out.append((f"torchdiffeq-{m}", {}))
        out += _product("dpmv3", order=[2, 3], predictor_pseudo=[False, True],
                        corrector=[True, False], corrector_threshold=[15, None])
        out += [("dpmv3", {"preset": "score-sde"}), ("dpmv3", {"preset": "edm"}),
                ("dpmv3", {"degenerated": True})]
    return out + teleport_configs(quick)


def teleport_configs(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    inners: list[tuple[str, dict[str, Any]]] = [
        ("dpmpp-2m", {}), ("unipc", {}), ("dpm-solver-3m", {}), ("dpmv3", {})]
    skips: list[float | str] = [0.1, 0.2, 0.3, "auto"]
    if not quick:
        inners += [("dpmpp-2m", {"solver_type": "taylor"}), ("unipc", {"predictor_order": 1}),
                   ("unipc", {"predictor_order": 3}), ("dpmpp-3m", {}),
                   ("dpm-solver-3m", {"official_d2": True}),
                   ("dpmv3", {"predictor_pseudo": True}), ("dpmv3", {"order": 2}),
                   ("dpmv3", {"corrector_threshold": None})]
        skips = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, "auto"]
    return [("teleport", {"inner": name, "inner_options": opts, "skip": s})
            for (name, opts), s in itertools.product(inners, skips)]


def solverlab_grids(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """Named grid rules: the official skip types, the peers' sigma grids and spacings
    (``exponential`` and ``lu-lambdas`` place the times of ``logsnr`` on the schedule's range,
    so they are run once, as ``logsnr``)."""
    if quick:
        return [("time-uniform", {}), ("time-quadratic", {}), ("logsnr", {}), ("karras", {})]
    return [("time-uniform", {}), ("time-quadratic", {}), ("logsnr", {}),
            *[("karras", {"rho": r}) for r in (3.0, 5.0, 7.0, 9.0)], ("beta", {}),
            *[("polyexponential", {"rho": r}) for r in (0.5, 2.0, 3.0)], ("vp", {}),
            ("linspace", {}), ("leading", {}), ("trailing", {})]


def _steps_for(solver: Any, budget: int) -> int | None:
    """The step count whose expected NFE is exactly ``budget`` (``None`` if none)."""
    for steps in range(budget, 0, -1):
        try:
            n = solver.expected_nfe(steps)
        except SolverlabError:
            continue
        if n == budget:
            return steps
    return None


def _solve(problem: Problem, solver: Any, grid_rule: Any, budget: int
           ) -> tuple[float, str] | None:
    """(error, end) of ``solver`` on ``grid_rule`` at exactly ``budget`` NFE, or ``None``."""
    steps = _steps_for(solver, budget)
    if steps is None:
        return None
    try:
        grid = grid_rule(problem.model.schedule, steps)
        sol = solver.solve(problem.model, problem.x, grid, progress=False)
    except SolverlabError:
        return math.inf, "failed"
    if sol.nfe != budget:
        return None
    end = ZERO if getattr(solver, "final_step", "none") == "denoise_to_zero" else T_MIN
    return median_rms(sol.x, reference_at(problem, end)), end


def run_solverlab(problem: Problem, budgets: tuple[int, ...], quick: bool, tally: Tally,
                  ems: Any) -> list[Result]:
    results = []
    grids = [(g, o, solverlab.get_grid(g, **o)) for g, o in solverlab_grids(quick)]
    for name, opts in solverlab_solvers(quick):
        try:
            solver = presets.build_solver(name, opts, data=problem.train, model=problem.model,
                                          ems=ems)
        except SolverlabError:  # an option combination the solver refuses
            for _ in range(len(grids) * len(budgets)):
                tally.add("solverlab", "refused")
            continue
        for (g, gopts, rule), budget in itertools.product(grids, budgets):
            r = _solve(problem, solver, rule, budget)
            if r is None:
                tally.add("solverlab", "skipped")
                continue
            err, end = r
            steps = _steps_for(solver, budget)
            cfg = presets.Config(solver=name, options=opts, grid=g, grid_options=gopts,
                                 steps=steps, nfe=budget, source="")
            key = repr((name, sorted(opts.items(), key=str), g, sorted(gopts.items())))
            tally.add("solverlab", "run" if math.isfinite(err) else "failed")
            results.append(Result("solverlab", cfg.label(), problem.name, budget, err, end,
                                  cfg.as_dict(), key))
    return results


def verify_build(problem: Problem, cfg: presets.Config, ems: Any, expected: float) -> None:
    """The preset path (``Config.build`` + ``Config.grid_for``) reproduces the sweep's
    number for ``cfg`` bit for bit."""
    solver = cfg.build(data=problem.train, model=problem.model, ems=ems)
    sol = solver.solve(problem.model, problem.x, cfg.grid_for(problem.model.schedule),
                       progress=False)
    err = median_rms(sol.x, problem.refs[T_MIN])
    assert sol.nfe == cfg.nfe and err == expected, (cfg.label(), sol.nfe, err, expected)


# -- presets: a second pass over every budget --------------------------------------------------
def preset_pass(problems: list[Problem], results: list[Result], ems: dict[str, Any],
                budgets: Iterable[int]) -> dict[str, Any]:
    """Shortlist the solverlab configurations that were among the best :data:`SHORTLIST` on a
    problem at a measured budget (plus the best data-free ones), run them at every budget, and
    pick per budget the one with the smallest worst-case ratio (error / best of the shortlist
    on that problem) over the problems; likewise among configurations needing no data."""
    mine = [r for r in results if r.family == "solverlab" and math.isfinite(r.error)
            and r.end == T_MIN]
    keys: dict[str, dict[str, Any]] = {}
    for p in problems:
        for n in {r.nfe for r in mine}:
            cell = sorted((r for r in mine if r.problem == p.name and r.nfe == n),
                          key=lambda r: r.error)
            free = [r for r in cell if not presets.config_from_dict(r.config).needs_data]
            for r in cell[:SHORTLIST] + free[:SHORTLIST // 2]:
                keys.setdefault(r.key, r.config)
    table: dict[int, dict[str, Any]] = {}
    errors: dict[tuple[str, str, int], float] = {}
    for key, c in keys.items():
        for p, n in itertools.product(problems, budgets):
            solver = presets.build_solver(c["solver"], c["options"], data=p.train,
                                          model=p.model, ems=ems[p.name])
            steps = _steps_for(solver, n)
            if steps is None:
                continue
            try:
                grid = solverlab.get_grid(c["grid"], **c["grid_options"])(p.model.schedule,
                                                                            steps)
                sol = solver.solve(p.model, p.x, grid, progress=False)
            except SolverlabError:
                continue
            if sol.nfe == n:
                errors[key, p.name, n] = median_rms(sol.x, p.refs[T_MIN])
    for n in budgets:
        for data_free in (False, True):
            cands = [k for k in keys if all((k, p.name, n) in errors for p in problems)
                     and not (data_free and presets.config_from_dict(
                         {**keys[k], "steps": 0, "nfe": 0}).needs_data)]
            every = [k for k in keys if all((k, p.name, n) in errors for p in problems)]
            best = {p.name: min(errors[k, p.name, n] for k in every) for p in problems}
            pick = min(cands, key=lambda k: max(errors[k, p.name, n] / best[p.name]
                                                for p in problems))
            solver = presets.build_solver(keys[pick]["solver"], keys[pick]["options"],
                                          data=problems[0].train, model=problems[0].model,
                                          ems=ems[problems[0].name])
            entry = {**keys[pick], "steps": _steps_for(solver, n), "nfe": n,
                     "errors": {p.name: errors[pick, p.name, n] for p in problems},
                     "ratios": {p.name: errors[pick, p.name, n] / best[p.name]
                                for p in problems}}
            table.setdefault("data_free" if data_free else "table", {})[n] = entry
    return table


def any_grid_pick(problems: list[Problem], results: list[Result]) -> dict[str, Any]:
    """The solver (no teleport, no data) with the smallest geometric mean over problems, NFE
    and grids of its error relative to the best error on that problem, NFE and grid."""
    rows = [r for r in results if r.family == "solverlab" and r.end == T_MIN
            and not presets.config_from_dict(r.config).needs_data
            and r.config["solver"] != "teleport"]
    cells: dict[tuple[str, int, str], float] = {}
    for r in rows:
        c = (r.problem, r.nfe, r.config["grid"] + repr(r.config["grid_options"]))
        cells[c] = min(cells.get(c, math.inf), r.error)
    score: dict[str, list[float]] = {}
    conf: dict[str, dict[str, Any]] = {}
    for r in rows:
        skey = repr((r.config["solver"], sorted(r.config["options"].items(), key=str)))
        c = (r.problem, r.nfe, r.config["grid"] + repr(r.config["grid_options"]))
        score.setdefault(skey, []).append(math.log(min(r.error, 1e3) / cells[c]))
        conf[skey] = r.config
    full = max(len(v) for v in score.values())
    pick = min((k for k in score if len(score[k]) == full),
               key=lambda k: sum(score[k]) / len(score[k]))
    return {"solver": conf[pick]["solver"], "options": conf[pick]["options"],
            "geometric_mean_ratio": math.exp(sum(score[pick]) / len(score[pick]))}


# -- output ------------------------------------------------------------------------------------
PEERS = ("diffusers", "k-diffusion", "official")


def best_of(results: list[Result], problem: str, nfe: int, families: Iterable[str],
            k: int = 1) -> list[Result]:
    fam = set(families)
    rows = [r for r in results if r.problem == problem and r.nfe == nfe and r.family in fam
            and math.isfinite(r.error)]
    return sorted(rows, key=lambda r: r.error)[:k]


def markdown(problems: list[Problem], results: list[Result], tally: Tally,
             budgets: tuple[int, ...], pick: dict[str, Any], anygrid: dict[str, Any],
             settings: dict[str, Any], why: list[str]) -> str:
    lines = ["# The frontier: solverlab's best configuration vs the best peer configuration",
             "", "Generated by `python bench/frontier.py`; " + ", ".join(
                 f"{k} {v}" for k, v in settings.items()) + ".", "",
             f"Error: the **median over the {settings['samples']} samples of the per-sample "
             "RMS error** "
             "`sqrt(mean_d (x_d - ref_d)^2)` at the configuration's end point against the "
             "float64 dopri8 reference (rtol = atol = 1e-10) from the same start state at "
             "`t = 1`: `t = 1/N` (training step 0), or `sigma = 0` for configurations that end "
             "there (continued by RK4 in sigma), or where a peer's option puts the end. Every "
             "configuration spends exactly the NFE budget (counted at the model); one that "
             "cannot is skipped at that budget. Goal (issue 13): best solverlab / best peer "
             f"<= {GOAL_RATIO} at NFE {', '.join(map(str, GOAL_NFE))}.", "",
             "## Configurations", "",
             "| family | run | non-finite | skipped (budget not reachable) | refused (invalid "
             "option combination) |", "|---|---:|---:|---:|---:|"]
    for fam in (*PEERS, "solverlab"):
        c = tally.counts.get(fam, {})
        lines.append(f"| {fam} | {c.get('run', 0)} | {c.get('failed', 0)} | "
                     f"{c.get('skipped', 0)} | {c.get('refused', 0)} |")
    peers = len({(r.family, r.key) for r in results if r.family in PEERS})
    lines += ["", "Counts are (configuration x problem x NFE) solves. Distinct peer "
              f"configurations run: {peers}"
              f"; distinct solverlab configurations: "
              f"{len({r.key for r in results if r.family == 'solverlab'})}.", ""]
    for p in problems:
        lines += [f"## {p.name}: {p.description}", "",
                  "| NFE | best peer | error | best solverlab | error | ratio | goal | "
                  "best solverlab without data | error | ratio |",
                  "|---:|---|---:|---|---:|---:|---|---|---:|---:|"]
        for n in budgets:
            peer = best_of(results, p.name, n, PEERS)
            mine = best_of(results, p.name, n, ["solverlab"])
            if not peer or not mine:
                continue
            ratio = mine[0].error / peer[0].error
            goal = ("met" if ratio <= GOAL_RATIO else "**not met**") if n in GOAL_NFE else "-"
            free = [r for r in best_of(results, p.name, n, ["solverlab"], 10**9)
                    if not presets.config_from_dict(r.config).needs_data][:1]
            tail = (f"{free[0].label} | {free[0].error:.3e} | {free[0].error / peer[0].error:.2f}"
                    if free else "- | - | -")
            lines.append(f"| {n} | {peer[0].family}: {peer[0].label} ({peer[0].end}) | "
                         f"{peer[0].error:.3e} | {mine[0].label} | {mine[0].error:.3e} | "
                         f"{ratio:.2f} | {goal} | {tail} |")
        lines += ["", "Best per peer family (error, configuration):", "",
                  "| NFE | " + " | ".join(PEERS) + " |", "|---:|" + "---|" * len(PEERS)]
        for n in budgets:
            cells = []
            for fam in PEERS:
                b = best_of(results, p.name, n, [fam])
                cells.append(f"{b[0].error:.2e}: {b[0].label}" if b else "-")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        for n in budgets:
            lines += ["", f"Top 5 at NFE {n} ({p.name}):", "",
                      "| peers | error | solverlab | error |", "|---|---:|---|---:|"]
            top_p = best_of(results, p.name, n, PEERS, 5)
            top_s = best_of(results, p.name, n, ["solverlab"], 5)
            for a, b in itertools.zip_longest(top_p, top_s):
                lines.append(
                    (f"| {a.family}: {a.label} ({a.end}) | {a.error:.3e} " if a else "| | ")
                    + (f"| {b.label} | {b.error:.3e} |" if b else "| | |"))
        lines.append("")
    lines += ["## Why a goal point is missed", ""] + (why or ["Every goal point is met."])
    lines += ["", "## Presets (`solverlab.presets`, the `preset` solver)", "",
              "A second pass runs the solverlab configurations that were among the best "
              f"{SHORTLIST} on a problem at a measured budget (and the best ones needing no "
              "training data) at every budget 5..20, and picks per budget the one with the "
              "smallest worst-case ratio over the two problems (its error / the best of the "
              "shortlist on that problem).", "",
              "Ratios: to the best of the shortlist at that budget (both columns); *vs peer*: "
              "the preset's error / the best peer's, where the budget was measured.", "",
              "| NFE | preset | ratios | vs peer | data-free preset | ratios | vs peer |",
              "|---:|---|---|---|---|---|---|"]
    for n in sorted(pick["table"]):
        a, b = pick["table"][n], pick["data_free"][n]
        lines.append(f"| {n} | {_cfg_label(a)} | {_ratios(a)} | {_vs_peer(results, a, n)} | "
                     f"{_cfg_label(b)} | {_ratios(b)} | {_vs_peer(results, b, n)} |")
    lines += ["", f"Without `nfe` the `preset` solver keeps the caller's grid and runs "
              f"`{anygrid['solver']}` with `{anygrid['options']}`: among the configurations "
              "needing no data, the one whose error is closest to the best on the same "
              "problem, NFE and grid (geometric mean of the ratio over every measured cell: "
              f"{anygrid['geometric_mean_ratio']:.2f}).", ""]
    return "\n".join(lines) + "\n"


def _cfg_label(c: dict[str, Any]) -> str:
    return presets.config_from_dict(c).label()


def _vs_peer(results: list[Result], c: dict[str, Any], n: int) -> str:
    parts = []
    for name, err in c["errors"].items():
        peer = best_of(results, name, n, PEERS)
        if peer:
            parts.append(f"{name} {err / peer[0].error:.2f}")
    return ", ".join(parts) or "-"


def _ratios(c: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in c["ratios"].items())


def explain_misses(problems: list[Problem], results: list[Result], budgets: tuple[int, ...],
                   ems: dict[str, Any]) -> list[str]:
    """For each goal point missed: how the best solverlab configuration's error is spread over
    the samples (its median vs the peer's, and the share of samples that are worse than the
    peer's median), measured."""
    out = []
    for p in problems:
        for n in (b for b in budgets if b in GOAL_NFE):
            peer = best_of(results, p.name, n, PEERS)
            mine = best_of(results, p.name, n, ["solverlab"])
            if not peer or not mine or mine[0].error <= GOAL_RATIO * peer[0].error:
                continue
            cfg = presets.config_from_dict(mine[0].config)
            solver = cfg.build(data=p.train, model=p.model, ems=ems[p.name])
            sol = solver.solve(p.model, p.x, cfg.grid_for(p.model.schedule), progress=False)
            e = (sol.x - p.refs[T_MIN]).pow(2).mean(dim=1).sqrt()
            q = torch.quantile(e, torch.tensor([0.1, 0.5, 0.9], dtype=F64)).tolist()
            out.append(
                f"- {p.name}, NFE {n}: ratio {mine[0].error / peer[0].error:.2f}. The best "
                f"solverlab configuration ({cfg.label()}) has per-sample errors "
                f"{q[0]:.2e} / {q[1]:.2e} / {q[2]:.2e} (10% / 50% / 90%); "
                f"{100 * float((e > GOAL_RATIO * peer[0].error).double().mean()):.0f}% of the "
                f"samples are above half the best peer's median ({peer[0].error:.2e}).")
    return out


def figure(problems: list[Problem], results: list[Result], budgets: tuple[int, ...]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(problems), 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(problems), squeeze=False)[0]
    styles = {"diffusers": "--s", "k-diffusion": "--^", "official": "--D", "solverlab": "-o"}
    for ax, p in zip(axes, problems):
        for fam, style in styles.items():
            pts = [(n, best_of(results, p.name, n, [fam])) for n in budgets]
            pts = [(n, b[0].error) for n, b in pts if b]
            if pts:
                ax.plot(*zip(*pts), style, ms=4, label=f"best {fam}")
        peer = [(n, best_of(results, p.name, n, PEERS)) for n in budgets]
        pts = [(n, GOAL_RATIO * b[0].error) for n, b in peer if b and n in GOAL_NFE]
        if pts:
            ax.plot(*zip(*pts), ":", color="0.4", label="goal: half the best peer")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(budgets), [str(n) for n in budgets])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("NFE")
        ax.set_ylabel("median per-sample RMS error")
        ax.set_title(f"{p.name}: {p.description}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="64 samples, NFE 5 and 10, fewer options (a 2-3 minute check)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import diffusers

    quick = args.quick
    samples = args.samples or (64 if quick else 256)
    budgets = QUICK_NFE if quick else NFE
    start = time.perf_counter()

    def note(what: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {what}", file=sys.stderr, flush=True)

    problems = [make_problem(n, s, lo, hi, samples) for n, s, lo, hi in PROBLEMS]
    note("references")
    ems = {pr.name: solverlab.compute_ems(pr.model, pr.train, grid_size=presets.EMS_GRID_SIZE,
                                          samples=presets.EMS_SAMPLES, progress=False)
           for pr in problems}
    note("EMS")
    tally = Tally()
    results: list[Result] = []
    for pr in problems:
        results += run_diffusers(pr, budgets, quick, tally)
        note(f"{pr.name}: diffusers")
        results += run_k_diffusion(pr, budgets, quick, tally)
        note(f"{pr.name}: k-diffusion")
        results += run_official(pr, budgets, quick, tally)
        note(f"{pr.name}: official")
        results += run_solverlab(pr, budgets, quick, tally, ems[pr.name])
        note(f"{pr.name}: solverlab")
        for n in budgets:
            b = best_of(results, pr.name, n, ["solverlab"])[0]
            verify_build(pr, presets.config_from_dict(b.config), ems[pr.name], b.error)
    pick = preset_pass(problems, results, ems, range(5, 11) if quick else presets.NFE_RANGE)
    note("presets")
    anygrid = any_grid_pick(problems, results)
    why = explain_misses(problems, results, budgets, ems)
    settings = {"samples": samples, "quick": quick, "evaluation seed": EVAL_SEED,
                "training seed": TRAIN_SEED, "training samples": TRAIN_SAMPLES,
                "torch": torch.__version__, "diffusers": diffusers.__version__,
                "k-diffusion": importlib.metadata.version("k-diffusion"),
                "python": platform.python_version(), "threads": 1,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                "wall time": f"{time.perf_counter() - start:.0f} s"}
    md = _io.write_text(args.out / "frontier.md",
                        markdown(problems, results, tally, budgets, pick, anygrid, settings, why))
    png = _io.write_figure(args.out / "frontier.png", figure(problems, results, budgets),
                           dpi=110)
    summary = {
        "settings": settings,
        "best": {pr.name: {str(n): {
            "solverlab": {"config": b.config, "error": b.error},
            "peer": {"family": q.family, "label": q.label, "end": q.end, "error": q.error},
            "ratio": b.error / q.error}
            for n in budgets
            for b, q in [(best_of(results, pr.name, n, ["solverlab"])[0],
                          best_of(results, pr.name, n, PEERS)[0])]} for pr in problems},
        "presets": {k: {str(n): v for n, v in t.items()} for k, t in pick.items()},
        "any_grid": anygrid,
        "counts": tally.counts,
    }
    js = _io.write_json(args.out / "frontier.json", summary)
    note(f"wrote {md}, {png} and {js}")
    return 0


if __name__ == "__main__":
    import importlib.metadata

    sys.exit(main())
