"""The figures of ``solverlab compare``: error against NFE (:func:`compare_figure`) and a
solver x grid heatmap at each NFE budget (:func:`heatmap_figure`).

Both take the :class:`~solverlab.compare.Row` objects of a comparison (anything with the
attributes ``solver``, ``grid``, ``nfe_budget``, ``nfe``, ``error`` and ``status``) and draw
with matplotlib's Agg canvas (no display, no global ``pyplot`` state).

Reading aids, so that dozens of solvers stay legible:

- a solver's colour is its **family** (the plugin that registers it; for a name the registry
  does not know, the part before the first ``-`` or space), its marker its place in the family,
  and no two solvers share a colour-marker pair (:func:`solver_styles`);
- the y-range is set by the solvers that converge: every error of a solver whose errors all stay
  at most :data:`OUTLIER` (a relative error of 1 is no better than returning zeros) is inside
  it; a larger error is drawn as a hollow marker on the panel's top edge (the line goes there
  too) and the figure says so;
- the x-axis has a tick at every NFE budget;
- one panel per grid, one legend for all, grouped by family.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from . import _io
from .errors import SolverlabError

__all__ = [
    "MARKERS", "OUTLIER", "Style", "compare_figure", "compare_plot", "family_of",
    "heatmap_figure", "heatmap_plot", "solver_styles",
]

#: Markers of the members of one family, in order (distinct at legend size).
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "p", "h", "d",
                            "8")
#: A solver whose error exceeds this anywhere does not set the y-range (relative error: 1 is
#: the error of returning zeros).
OUTLIER = 1.0
_OK = "ok"


@attrs.frozen
class Style:
    """How one solver is drawn: ``family`` (legend group), ``color`` (RGBA), ``marker``."""

    family: str
    color: tuple[float, float, float, float]
    marker: str


def family_of(name: str) -> str:
    """The family of a solver name: the plugin that registers it, else the name's prefix
    (``"unipc bh1 shortcut"`` -> ``"unipc"``, ``"torchdiffeq-rk4"`` -> ``"torchdiffeq"``)."""
    try:
        from .registry import get_registry

        entry = get_registry().entry("solver", name)
        plugin = str(getattr(entry, "plugin", "") or "")
        if plugin:
            return plugin.removeprefix("solverlab_")
    except SolverlabError:  # not registered (a benchmark's label): the name's prefix
        pass
    return name.replace(" ", "-").split("-")[0]


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours: tab10, then tab20's light shades, then evenly spaced hues."""
    import matplotlib

    base = [matplotlib.colormaps["tab10"](i) for i in range(10)]
    base += [matplotlib.colormaps["tab20"](2 * i + 1) for i in range(10)]
    if n <= len(base):
        return base[:n]
    hsv = matplotlib.colormaps["hsv"]
    return base + [hsv(i / (n - len(base) + 1)) for i in range(n - len(base))]


def _shade(color: Sequence[float], j: int, m: int) -> tuple[float, float, float, float]:
    """Member ``j`` of ``m``: the family colour from darker to lighter (the hue stays), so
    lines of one family can be told apart besides their markers."""
    f = 0.0 if m == 1 else -0.35 + 0.7 * j / (m - 1)
    rgb = [c + (1 - c) * f if f > 0 else c * (1 + f) for c in color[:3]]
    return (rgb[0], rgb[1], rgb[2], 1.0)


def solver_styles(names: Iterable[str]) -> dict[str, Style]:
    """A :class:`Style` per solver name: one colour per family (a family with more members than
    :data:`MARKERS` takes another colour for each further group), markers in member order.
    Within a family the colour runs from darker to lighter. The (colour, marker) pairs are
    unique by construction."""
    names = list(dict.fromkeys(names))
    families: dict[str, list[str]] = {}
    for n in names:
        families.setdefault(family_of(n), []).append(n)
    groups = [(fam, members[k:k + len(MARKERS)]) for fam, members in families.items()
              for k in range(0, len(members), len(MARKERS))]
    colors = _colors(len(groups))
    out: dict[str, Style] = {}
    for (fam, members), color in zip(groups, colors):
        for j, n in enumerate(members):
            out[n] = Style(family=fam, color=_shade(color, j, len(members)), marker=MARKERS[j])
    return {n: out[n] for n in names}


def _ok(r: Any) -> bool:
    return r.status == _OK and r.error is not None and r.error > 0 and math.isfinite(r.error)


def _select(rows: Sequence[Any], solvers: Iterable[str] | str | None) -> list[str]:
    present = list(dict.fromkeys(r.solver for r in rows))
    if solvers is None:
        return present
    if isinstance(solvers, str):
        solvers = solvers.split(",")
    wanted = [s.strip() for s in solvers if s.strip()]
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise ValueError(f"plot solvers {unknown} are not in the comparison; it has "
                         f"{', '.join(present)}")
    return list(dict.fromkeys(wanted))


def _y_range(series: Mapping[Any, list[tuple[int, float]]]) -> tuple[float, float]:
    errors = [e for pts in series.values() for _, e in pts]
    if not errors:
        return 1e-3, 1.0
    converging = [e for pts in series.values() if max(e for _, e in pts) <= OUTLIER
                  for _, e in pts]
    top = max(converging or errors)
    bottom = min(errors)
    if top <= bottom:
        top = bottom * 10
    return bottom / 1.6, top * 1.6


def compare_plot(rows: Sequence[Any], solvers: Iterable[str] | str | None = None,
                 title: str | None = None) -> Any:
    """The error-vs-NFE figure (a matplotlib ``Figure``): one log-log panel per grid, one line
    per solver (``solvers``: the names to draw, default all, in the rows' order; the styles
    are those of all the rows' solvers, so a solver looks the same whatever is drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, NullLocator

    styles = solver_styles(r.solver for r in rows)
    names = _select(rows, solvers)
    # Adaptive rows (``kind="adaptive"``: a tolerance sweep, no grid) are drawn in every grid's
    # panel as dashed (NFE, error) lines; the panels and the ticks come from the budget rows.
    adaptive = [r for r in rows if getattr(r, "kind", None) == "adaptive"]
    fixed = [r for r in rows if getattr(r, "kind", None) != "adaptive"]
    grids = list(dict.fromkeys(r.grid for r in fixed)) or ["(adaptive)" if adaptive
                                                           else "(none)"]
    budgets = sorted({r.nfe_budget for r in fixed if r.nfe_budget is not None})
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in fixed:
        if r.solver in names and _ok(r):
            series.setdefault((r.solver, r.grid), []).append((r.nfe, r.error))
    for r in adaptive:
        if r.solver in names and _ok(r):
            for g in grids:
                series.setdefault((r.solver, g), []).append((r.nfe, r.error))
    for pts in series.values():
        pts.sort()
    low, top = _y_range(series)
    # The budgets' range (and the adaptive sweeps'); a solver that spends fewer NFE than a
    # budget (2 or 3 per step) is drawn at what it spent, one that overspends (an implicit
    # method) runs off the right edge.
    xs_all = budgets + [r.nfe for r in adaptive if r.solver in names and _ok(r)]
    xlim = ((min(xs_all) / 1.12, max(xs_all) * 1.12) if xs_all else (1.0, 10.0))
    swept = {r.solver for r in adaptive}

    n_leg = len(names) + len({styles[n].family for n in names})
    fig = Figure(figsize=(4.4 * len(grids) + 2.8, max(4.6, 0.19 * n_leg / (1 + (n_leg > 34)))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(grids), sharey=True, squeeze=False)[0]
    outliers = False
    for ax, g in zip(axes, grids):
        drawn = False
        for n in names:
            pts = series.get((n, g))
            if not pts:
                continue
            st, drawn = styles[n], True
            xs = [p[0] for p in pts]
            ys = [min(p[1], top) for p in pts]
            ax.plot(xs, ys, color=st.color, marker=st.marker, markersize=5, linewidth=1.1,
                    markeredgewidth=0.6, markeredgecolor="k", alpha=0.9,
                    linestyle="--" if n in swept else "-")
            for x, e in pts:
                if e > top and xlim[0] <= x <= xlim[1]:  # hollow, on the top edge
                    outliers = True
                    ax.plot([x], [top], marker=st.marker, markersize=7, linestyle="none",
                            markerfacecolor="white", markeredgecolor=st.color,
                            markeredgewidth=1.5, clip_on=False, zorder=5)
        ax.set_title(f"grid: {g}", fontsize="medium")
        ax.set_xlabel("NFE (actual; ticks: the budgets)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if budgets:
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_xlim(*xlim)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(low, top)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="y", alpha=0.12)
        if not drawn:
            ax.text(0.5, 0.5, "no successful solve", ha="center", va="center",
                    transform=ax.transAxes)
    axes[0].set_ylabel("relative RMS error vs reference")
    if outliers:
        axes[0].annotate(f"hollow markers on the top edge: error > {top:.2g} (off scale)",
                         xy=(0, 1), xycoords="axes fraction", xytext=(0, 18),
                         textcoords="offset points", fontsize="small", color="0.3")
    handles, labels, headers = [], [], []
    for fam in dict.fromkeys(styles[n].family for n in names):
        handles.append(Line2D([], [], linestyle="none"))
        headers.append(len(labels))
        labels.append(fam.replace("_", "-"))
        for n in names:
            if styles[n].family == fam:
                st = styles[n]
                handles.append(Line2D([], [], color=st.color, marker=st.marker, markersize=5,
                                      markeredgewidth=0.6, markeredgecolor="k",
                                      linestyle="--" if n in swept else "-"))
                labels.append(n + (" (tolerances)" if n in swept else ""))
    if title:
        fig.suptitle(title)
    if handles:
        legend = fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                            fontsize="small", frameon=False,
                            ncol=1 if len(handles) <= 34 else 2, handlelength=1.6)
        for i in headers:  # family names in bold
            legend.get_texts()[i].set_fontweight("bold")
    fig.tight_layout()
    return fig


def compare_figure(rows: Sequence[Any], path: str | os.PathLike[str],
                   solvers: Iterable[str] | str | None = None, title: str | None = None,
                   dpi: int = 120) -> Any:
    """Write :func:`compare_plot` to ``path`` (format from the suffix, atomically)."""
    return _io.write_figure(path, compare_plot(rows, solvers, title), dpi=dpi,
                            bbox_inches="tight")


def heatmap_plot(rows: Sequence[Any], solvers: Iterable[str] | str | None = None,
                 title: str | None = None) -> Any:
    """``log10`` of the error, solver (rows) x grid (columns), one panel per NFE budget, one
    colour scale for all; a cell with no result shows its status' first word."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = _select(rows, solvers)
    grids = list(dict.fromkeys(r.grid for r in rows))
    budgets = sorted({r.nfe_budget for r in rows})
    cell = {(r.solver, r.grid, r.nfe_budget): r for r in rows}
    values = np.full((len(budgets), len(names), len(grids)), np.nan)
    for b, budget in enumerate(budgets):
        for i, n in enumerate(names):
            for j, g in enumerate(grids):
                r = cell.get((n, g, budget))
                if r is not None and _ok(r):
                    values[b, i, j] = math.log10(r.error)
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-3.0, 0.0)
    vmax = min(vmax, math.log10(OUTLIER) + 1)  # above 10x OUTLIER: saturated

    w = max(1.0, 0.55 * len(grids)) + 0.2
    fig = Figure(figsize=(1.8 + w * len(budgets) + 1.0, 1.4 + 0.24 * max(len(names), 4)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(budgets), 1), sharey=True, squeeze=False)[0]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = None
    for b, (ax, budget) in enumerate(zip(axes, budgets)):
        image = ax.imshow(values[b], cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        for i, n in enumerate(names):
            for j, g in enumerate(grids):
                v = values[b, i, j]
                if np.isfinite(v):
                    text = f"{v:.1f}"
                    dark = (v - vmin) < 0.6 * (vmax - vmin) if vmax > vmin else True
                    color = "white" if dark else "black"
                else:
                    r = cell.get((n, g, budget))
                    text = "-" if r is None else r.status.split(":")[0].split()[0][:4]
                    color = "0.3"
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=color)
        ax.set_xticks(range(len(grids)), grids, rotation=45, ha="right", fontsize="small")
        ax.set_title(f"NFE {budget}", fontsize="medium")
        ax.tick_params(length=0)
    axes[0].set_yticks(range(len(names)), names, fontsize="small")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01)
        bar.set_label("log10 relative RMS error")
    fig.suptitle(title or "log10 error: solver x grid at each NFE budget (grey: no result)")
    return fig


def heatmap_figure(rows: Sequence[Any], path: str | os.PathLike[str],
                   solvers: Iterable[str] | str | None = None, title: str | None = None,
                   dpi: int = 120) -> Any:
    """Write :func:`heatmap_plot` to ``path`` (format from the suffix, atomically)."""
    return _io.write_figure(path, heatmap_plot(rows, solvers, title), dpi=dpi,
                            bbox_inches="tight")
