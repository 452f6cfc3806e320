"""Presets: the best measured configuration per NFE budget (solver, options, grid, teleport
skip), so that a user gets it without knowing the options.

    cfg = solverlab.presets.best(10)             # a Config
    solver = cfg.build(data=training_samples)    # the configured solver, ready to solve
    x = solver.solve(model, x_T, cfg.grid_for(model.schedule)).x

or, through the registry (plugin ``solverlab_presets``)::

    solverlab.get_solver("preset", nfe=10, data=training_samples).solve(model, x_T, grid)

The table (:data:`TABLE`) was chosen by ``bench/frontier.py`` (``bench/frontier.md``): two
16-dimensional, 6-component Gaussian mixtures on the DDPM linear schedule (``vp-discrete``),
256 start samples, the median over samples of the per-sample RMS error at ``t = 1/N``; for
every budget in 5..20 the configuration whose worse error ratio over the two problems (its
error / the best solverlab error on that problem) is the smallest. It is copied into this
module (the benchmark's ``frontier.json`` is not read at run time); ``tests/test_presets.py``
checks that the two agree.

Configurations that need training data (``teleport``, whose Gaussian is fitted to it, and
``dpmv3``, whose EMS are computed from it, Zheng et al. 2023, eqs. 13-14) are marked
``needs_data``; :data:`DATA_FREE` holds the best configuration per budget that needs none,
and :data:`ANY_GRID` the solver that is best on average over the grids a caller may pass
(the ``preset`` solver without ``nfe``). Data are training samples in the model's data space,
never the batch being sampled: the benchmark fitted every configuration on 1024 draws of
the data distribution with a seed other than the evaluation batch's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import attrs
from torch import Tensor

from .errors import OptionError, SolverlabError

__all__ = [
    "ANY_GRID",
    "DATA_FREE",
    "EMS_GRID_SIZE",
    "EMS_SAMPLES",
    "NFE_RANGE",
    "TABLE",
    "Config",
    "best",
    "build_solver",
    "config_from_dict",
]

#: The budgets the table covers.
NFE_RANGE = range(5, 21)
#: EMS of a ``dpmv3`` configuration: ``compute_ems(model, data, grid_size=EMS_GRID_SIZE,
#: samples=min(len(data), EMS_SAMPLES))``, as the benchmark computed them.
EMS_GRID_SIZE = 400
EMS_SAMPLES = 1024


def _frozen_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(f"presets: options {value!r} must be a dict")
    return copy.deepcopy(dict(value))


@attrs.frozen(kw_only=True)
class Config:
    """One configuration: the registered ``solver`` with ``options``, solved on the grid rule
    ``grid`` (with ``grid_options``) of ``steps`` steps, spending ``nfe`` evaluations.

    A ``teleport`` configuration names its inner solver in ``options["inner"]`` (with
    ``options["inner_options"]``); a ``dpmv3`` solver, outer or inner, gets its EMS from the
    training data at :meth:`build`. ``source`` says which measurement chose it."""

    solver: str
    options: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)
    grid: str
    grid_options: dict[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)
    steps: int
    nfe: int
    source: str = ""

    @property
    def uses_dpmv3(self) -> bool:
        """Whether a ``dpmv3`` solver (outer or teleport's inner) with EMS is part of it."""
        if self.solver == "dpmv3":
            return not self.options.get("degenerated", False)
        inner_opts = self.options.get("inner_options", {})
        return (self.solver == "teleport" and self.options.get("inner") == "dpmv3"
                and not inner_opts.get("degenerated", False))

    @property
    def needs_data(self) -> bool:
        """Whether :meth:`build` needs training data (a teleport jump or EMS)."""
        teleport = self.solver == "teleport" and self.options.get("skip", 0.0) != 0.0
        return teleport or self.uses_dpmv3

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def label(self) -> str:
        """A short human-readable name, e.g. ``teleport(inner=dpmv3, skip=0.2) on time-uniform``."""
        def fmt(opts: Mapping[str, Any]) -> str:
            return ", ".join(f"{k}={{{fmt(v)}}}" if isinstance(v, Mapping) else f"{k}={v}"
                             for k, v in opts.items() if v != {})

        grid = self.grid + (f"({fmt(self.grid_options)})" if self.grid_options else "")
        return f"{self.solver}({fmt(self.options)}) on {grid}"

    def grid_for(self, schedule: Any, t_start: float | None = None,
                 t_end: float | None = None) -> Tensor:
        """This configuration's ``steps + 1`` times from ``t_start`` to ``t_end`` (default: the
        schedule's range). The diffusers spacings (``linspace``, ``leading``, ``trailing``)
        place integer timesteps on the whole schedule and take no other ends."""
        from .registry import get_grid

        rule = get_grid(self.grid, **self.grid_options)
        if self.grid in ("linspace", "leading", "trailing"):
            whole = (t_start is None or abs(t_start - schedule.t_max) < 1e-12) and (
                t_end is None or abs(t_end - schedule.t_min) < 1e-12)
            if not whole:
                raise OptionError(
                    f"preset grid {self.grid!r} places diffusers' integer timesteps on the "
                    f"schedule's whole range [{schedule.t_min!r}, {schedule.t_max!r}]; got "
                    f"t_start={t_start!r}, t_end={t_end!r}")
            try:
                return rule(schedule, self.steps)
            except SolverlabError as e:
                raise OptionError(
                    f"preset {self.label()} cannot place its steps on schedule "
                    f"{getattr(schedule, 'name', schedule)!r}: {e}. Its spacing was measured on "
                    "'vp-discrete': use a discrete schedule, another budget (nfe) or the "
                    "preset without nfe") from None
        return rule(schedule, self.steps, t_start=t_start, t_end=t_end)

    def build(self, data: Tensor | None = None, model: Any = None, ems: Any = None) -> Any:
        """The configured solver (:func:`build_solver`)."""
        return build_solver(self.solver, self.options, data=data, model=model, ems=ems)


def build_solver(solver: str, options: Mapping[str, Any], *, data: Tensor | None = None,
                 model: Any = None, ems: Any = None) -> Any:
    """The registered ``solver`` with ``options``, given what it needs:

    - ``teleport``: ``data`` (training samples) for its Gaussian fit when its ``skip`` is not
      0; an inner ``dpmv3`` is built here (below) and passed as an instance;
    - ``dpmv3`` (not ``degenerated``): ``ems`` if given, else EMS computed from ``data`` for
      ``model`` with :data:`EMS_GRID_SIZE` cells and ``min(len(data), EMS_SAMPLES)``
      samples (``solverlab.compute_ems``).

    Raises :class:`~solverlab.errors.OptionError` when data are needed and missing."""
    from .ems import compute_ems
    from .registry import get_solver

    options = dict(options)

    def v3(opts: Mapping[str, Any]) -> Any:
        if opts.get("degenerated", False):
            return get_solver("dpmv3", **opts)
        nonlocal ems
        if ems is None:
            if data is None or model is None:
                raise OptionError(
                    "presets: this configuration runs dpmv3, whose EMS are computed from "
                    "training data: give data= (training samples in the model's data space; "
                    "the preset solver computes them at prepare(model, data)) or ems=")
            ems = compute_ems(model, data, grid_size=EMS_GRID_SIZE,
                              samples=min(int(data.shape[0]), EMS_SAMPLES), progress=False)
        return get_solver("dpmv3", ems=ems, **opts)

    if solver == "dpmv3":
        return v3(options)
    if solver == "teleport":
        if options.get("inner") == "dpmv3":
            options["inner"] = v3(options.pop("inner_options", {}))
        if options.get("skip", 0.0) != 0.0:
            if data is None:
                raise OptionError(
                    f"presets: teleport with skip={options.get('skip')!r} jumps along a "
                    "Gaussian fitted to training data: give data= (training samples in the "
                    "model's data space, never the batch being sampled)")
            options["data"] = data
    return get_solver(solver, **options)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """A :class:`Config` from its :meth:`Config.as_dict` form (the benchmark's JSON)."""
    return Config(**{f.name: d[f.name] for f in attrs.fields(Config) if f.name in d})


# -- the table (copied from bench/frontier.json; see the module docstring) -------------------
_SOURCE = "bench/frontier.md (bench/frontier.py, 2026-11-30)"


def _c(nfe: int, solver: str, options: dict[str, Any], grid: str, grid_options: dict[str, Any],
       steps: int, errors: tuple[float, float]) -> Config:
    return Config(solver=solver, options=options, grid=grid, grid_options=grid_options,
                  steps=steps, nfe=nfe, source=f"{_SOURCE}: median per-sample RMS error "
                  f"{errors[0]:.3g} (narrow), {errors[1]:.3g} (wide)")


#: The preset per NFE budget (best worst-case ratio over the benchmark's two problems).
TABLE: dict[int, Config] = {
    5: _c(
        5,
        "teleport",
        {"inner": "dpmv3", "inner_options": {}, "skip": 0.15},
        "linspace",
        {},
        5,
        (0.0219, 0.0287),
    ),
    6: _c(
        6,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"order": 2}, "skip": 0.25},
        "polyexponential",
        {"rho": 0.5},
        6,
        (0.0107, 0.0175),
    ),
    7: _c(
        7,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.25},
        "polyexponential",
        {"rho": 0.5},
        7,
        (0.00658, 0.00985),
    ),
    8: _c(
        8,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.25},
        "polyexponential",
        {"rho": 0.5},
        8,
        (0.00441, 0.00809),
    ),
    9: _c(
        9,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.2},
        "polyexponential",
        {"rho": 0.5},
        9,
        (0.00366, 0.00464),
    ),
    10: _c(
        10,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.2},
        "polyexponential",
        {"rho": 0.5},
        10,
        (0.00299, 0.00403),
    ),
    11: _c(
        11,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.2},
        "polyexponential",
        {"rho": 0.5},
        11,
        (0.00244, 0.00304),
    ),
    12: _c(
        12,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.2},
        "polyexponential",
        {"rho": 0.5},
        12,
        (0.00196, 0.0027),
    ),
    13: _c(
        13,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.2},
        "polyexponential",
        {"rho": 0.5},
        13,
        (0.00166, 0.00242),
    ),
    14: _c(
        14,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"predictor_pseudo": True}, "skip": 0.15},
        "polyexponential",
        {"rho": 0.5},
        14,
        (0.00165, 0.00171),
    ),
    15: _c(
        15,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"corrector_threshold": None}, "skip": 0.15},
        "polyexponential",
        {"rho": 0.5},
        15,
        (0.0019, 0.00185),
    ),
    16: _c(
        16,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"corrector_threshold": None}, "skip": 0.15},
        "polyexponential",
        {"rho": 0.5},
        16,
        (0.00139, 0.00149),
    ),
    17: _c(
        17,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"corrector_threshold": None}, "skip": 0.15},
        "polyexponential",
        {"rho": 0.5},
        17,
        (0.00113, 0.00141),
    ),
    18: _c(
        18,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"corrector_threshold": None}, "skip": 0.15},
        "polyexponential",
        {"rho": 0.5},
        18,
        (0.000973, 0.00119),
    ),
    19: _c(
        19,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"corrector_threshold": None}, "skip": 0.15},
        "polyexponential",
        {"rho": 0.5},
        19,
        (0.000864, 0.00122),
    ),
    20: _c(
        20,
        "teleport",
        {"inner": "dpmv3", "inner_options": {"corrector_threshold": None}, "skip": 0.1},
        "karras",
        {"rho": 9.0},
        20,
        (0.000838, 0.00104),
    ),
}
#: The preset per NFE budget among configurations that need no training data.
DATA_FREE: dict[int, Config] = {
    5: _c(
        5,
        "dpm-solver-3",
        {"solver_type": "taylor", "substeps": "grid", "lower_order_final": True},
        "leading",
        {},
        5,
        (0.0564, 0.097),
    ),
    6: _c(
        6,
        "unipc",
        {
            "predictor_order": 2,
            "variant": "bh2",
            "predict": "data",
            "corrector": True,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "auto",
        },
        "time-quadratic",
        {},
        6,
        (0.0359, 0.031),
    ),
    7: _c(
        7,
        "unipc",
        {
            "predictor_order": 2,
            "variant": "bh2",
            "predict": "data",
            "corrector": True,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "auto",
        },
        "time-quadratic",
        {},
        7,
        (0.0173, 0.0218),
    ),
    8: _c(
        8,
        "unipc",
        {
            "predictor_order": 2,
            "variant": "bh2",
            "predict": "data",
            "corrector": False,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "auto",
        },
        "time-quadratic",
        {},
        8,
        (0.0152, 0.0231),
    ),
    9: _c(
        9,
        "unipc",
        {
            "predictor_order": 3,
            "variant": "bh2",
            "predict": "noise",
            "corrector": False,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "auto",
        },
        "logsnr",
        {},
        9,
        (0.0146, 0.0184),
    ),
    10: _c(
        10,
        "unipc",
        {
            "predictor_order": 3,
            "variant": "bh2",
            "predict": "noise",
            "corrector": False,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "auto",
        },
        "logsnr",
        {},
        10,
        (0.0111, 0.0172),
    ),
    11: _c(
        11,
        "dpm-solver-3m",
        {
            "solver_type": "dpmsolver",
            "lower_order_final": "auto",
            "warmup": "corrected",
            "official_d2": False,
        },
        "logsnr",
        {},
        11,
        (0.011, 0.0139),
    ),
    12: _c(
        12,
        "pndm-plms",
        {"midpoint": "sigma", "warmup": "diffusers", "weights": "fixed"},
        "time-quadratic",
        {},
        11,
        (0.00781, 0.0103),
    ),
    13: _c(
        13,
        "pndm-plms",
        {"midpoint": "sigma", "warmup": "diffusers", "weights": "fixed"},
        "time-quadratic",
        {},
        12,
        (0.00637, 0.00765),
    ),
    14: _c(
        14,
        "pndm-plms",
        {"midpoint": "sigma", "warmup": "diffusers", "weights": "fixed"},
        "time-quadratic",
        {},
        13,
        (0.00568, 0.00599),
    ),
    15: _c(
        15,
        "pndm-plms",
        {"midpoint": "sigma", "warmup": "diffusers", "weights": "fixed"},
        "time-quadratic",
        {},
        14,
        (0.00461, 0.00527),
    ),
    16: _c(
        16,
        "pndm-plms",
        {"midpoint": "sigma", "warmup": "diffusers", "weights": "fixed"},
        "time-quadratic",
        {},
        15,
        (0.00406, 0.00477),
    ),
    17: _c(
        17,
        "pndm-plms",
        {"midpoint": "sigma", "warmup": "diffusers", "weights": "fixed"},
        "time-quadratic",
        {},
        16,
        (0.0036, 0.00427),
    ),
    18: _c(
        18,
        "unipc",
        {
            "predictor_order": 3,
            "variant": "bh2",
            "predict": "data",
            "corrector": True,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "official",
        },
        "time-quadratic",
        {},
        18,
        (0.00267, 0.00377),
    ),
    19: _c(
        19,
        "unipc",
        {
            "predictor_order": 3,
            "variant": "bh1",
            "predict": "noise",
            "corrector": True,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "auto",
        },
        "time-quadratic",
        {},
        19,
        (0.00195, 0.00335),
    ),
    20: _c(
        20,
        "unipc",
        {
            "predictor_order": 3,
            "variant": "bh2",
            "predict": "data",
            "corrector": True,
            "diffusers_order2_shortcut": True,
            "lower_order_final": "official",
        },
        "time-quadratic",
        {},
        20,
        (0.00177, 0.00283),
    ),
}
#: The ``preset`` solver without ``nfe``: a solver (no grid of its own, no data) that keeps
#: the caller's grid, the one closest to the best on the same problem, NFE and grid (geometric
#: mean of the ratio over every measured cell: 1.78); ``grid``, ``steps`` and ``nfe`` are
#: placeholders (it runs on the caller's grid).
ANY_GRID: Config | None = Config(
    solver="dpm-solver-2m", options={"solver_type": "taylor", "lower_order_final": False},
    grid="time-uniform", steps=10, nfe=10,
    source="bench/frontier.md: the solver closest to the best on every problem, NFE and grid")


def best(nfe: int, *, data_free: bool = False) -> Config:
    """The preset for a budget of ``nfe`` evaluations (``nfe`` in :data:`NFE_RANGE`): from
    :data:`TABLE`, or :data:`DATA_FREE` with ``data_free=True`` (no training data needed)."""
    ok = isinstance(nfe, int) and not isinstance(nfe, bool) and nfe in NFE_RANGE
    if not ok:
        raise OptionError(
            f"presets: nfe={nfe!r} is not allowed; choose an integer in "
            f"{NFE_RANGE.start}..{NFE_RANGE.stop - 1} (the budgets the benchmark measured)")
    table = DATA_FREE if data_free else TABLE
    return table[nfe]
