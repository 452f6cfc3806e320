"""The registry: every part a user can name comes from a plugin, first-party parts included.

Built lazily on the first lookup from the core's own parts (plugin ``solverlab``) and the
entry points of group ``solverlab``. First-party plugins (entry points of the distribution
``solverlab``) are loaded first, so they keep their names: a later plugin's part that takes a
taken name is refused alone and reported under :attr:`Registry.broken` naming both plugins.
The plugin-name prefix ``solverlab_`` (entry-point names and top-level modules) is reserved
for first-party plugins; a third party's entry point that uses it is refused and reported (to
replace a first-party plugin, block it and register yours under a name of your own).

A plugin that fails to import or to register (any exception, ``SystemExit`` included; only
``KeyboardInterrupt`` propagates) is recorded in :attr:`Registry.broken` with its error and
its parts are withdrawn; the others keep working. A function named ``solverlab_*`` that no
hook specification knows, or a hook function not marked ``@solverlab.hookimpl``, is reported
there too (it would never be called). Names listed in the environment variable
``SOLVERLAB_BLOCK_PLUGINS`` (comma separated entry-point names) are not loaded.
"""

from __future__ import annotations

import contextvars
import difflib
import inspect
import os
import re
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import (
    DuplicateNameError,
    OptionError,
    RegistrationError,
    UnknownNameError,
)
from .grid import Grid
from .model import Model
from .objective import Objective
from .parameterization import Parameterization
from .schedule import Schedule
from .solver import Solver

__all__ = [
    "BLOCK_ENV",
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY",
    "RESERVED_PREFIX",
    "BrokenPlugin",
    "Entry",
    "Registry",
    "get_grid",
    "get_model",
    "get_objective",
    "get_parameterization",
    "get_registry",
    "get_schedule",
    "get_solver",
    "reset_registry",
]

ENTRY_POINT_GROUP = "solverlab"
BLOCK_ENV = "SOLVERLAB_BLOCK_PLUGINS"
CORE_PLUGIN = "solverlab"
#: The distribution whose entry points are first-party plugins.
FIRST_PARTY = "solverlab"
#: Entry-point names and top-level modules that only first-party plugins may use.
RESERVED_PREFIX = "solverlab_"

#: kind -> (base class, hook name); the order is the order of ``solverlab list``.
KINDS: dict[str, tuple[type, str]] = {
    "solver": (Solver, "solverlab_register_solvers"),
    "schedule": (Schedule, "solverlab_register_schedules"),
    "grid": (Grid, "solverlab_register_grids"),
    "parameterization": (Parameterization, "solverlab_register_parameterizations"),
    "model": (Model, "solverlab_register_models"),
    "objective": (Objective, "solverlab_register_objectives"),
}


@attrs.frozen
class Entry:
    """One registered part: its ``kind``, ``name``, class, and the plugin that brought it."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str | None


@attrs.frozen
class BrokenPlugin:
    """A plugin that failed to import or register, or a part of it that was refused, and why."""

    plugin: str
    distribution: str | None
    error: str


class Registry:
    """Parts by kind and name. Plugins call :meth:`add`; users call the ``get_*`` lookups."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.broken: list[BrokenPlugin] = []
        self.blocked: list[str] = []
        self.plugin_manager: pluggy.PluginManager | None = None
        self._plugin: tuple[str, str | None] = ("<direct>", None)
        self._dists: dict[str, str | None] = {}
        self._loading = False
        self._unchecked: list[Entry] = []

    # -- registration -------------------------------------------------------------------
    def add(self, cls: type, *, name: str | None = None) -> Entry | None:
        """Register ``cls`` (a concrete subclass of a solverlab base) under ``name`` (default:
        its ``name`` class attribute). Raises :class:`RegistrationError` for an abstract class,
        a non-solverlab class or a solver without a declared ``order``, and
        :class:`DuplicateNameError` naming both plugins for a name already taken. While plugins
        load, a taken name is not raised: the part is refused, reported under :attr:`broken`,
        and ``None`` returned, so that the plugin's other parts still register."""
        plugin, dist = self._plugin
        if not inspect.isclass(cls):
            raise RegistrationError(
                f"plugin {plugin!r}: registry.add() takes a class, not {cls!r}"
            )
        kind = next((k for k, (base, _) in KINDS.items() if issubclass(cls, base)), None)
        if kind is None:
            bases = ", ".join(b.__name__ for b, _ in KINDS.values())
            raise RegistrationError(
                f"plugin {plugin!r}: {cls.__qualname__} is not a subclass of any of {bases}"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise RegistrationError(
                f"plugin {plugin!r}: {kind} {cls.__qualname__} is abstract (implement {missing})"
            )
        name = getattr(cls, "name", None) if name is None else name
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise RegistrationError(
                f"plugin {plugin!r}: {kind} {cls.__qualname__} needs a name without spaces "
                f"(class attribute `name` or registry.add(cls, name=...)); got {name!r}"
            )
        if kind == "solver":
            order = _static_order(cls)
            if _valid_order(order) and not self._loading:
                order = declared_order(cls)  # what its default options give
            if not _valid_order(order):
                raise RegistrationError(_order_message(plugin, name, cls, order))
        taken = self._entries[kind].get(name)
        if taken is not None:
            if (taken.plugin, taken.distribution) == (plugin, dist):
                error = DuplicateNameError(
                    f"{kind} {name!r} is already registered ({taken.cls.__qualname__}, by "
                    f"{_who(plugin, dist)}); registry.add() was called twice with that name: "
                    "give the new part another name")
            else:
                error = DuplicateNameError(
                    f"{kind} {name!r} is registered by two plugins: "
                    f"{_who(taken.plugin, taken.distribution)} and {_who(plugin, dist)}; "
                    f"the first keeps it (block one with {BLOCK_ENV}=<plugin>)"
                )
            if not self._loading:
                raise error
            self.broken.append(BrokenPlugin(plugin, dist, _describe(error)))
            return None
        entry = Entry(kind=kind, name=name, cls=cls, plugin=plugin, distribution=dist)
        self._entries[kind][name] = entry
        if kind == "solver" and self._loading:
            self._unchecked.append(entry)  # its default options' order: once all are in
        return entry

    def _withdraw(self, plugin: str) -> None:
        for table in self._entries.values():
            for name in [n for n, e in table.items() if e.plugin == plugin]:
                del table[name]

    def _run_plugin_hooks(self, pm: pluggy.PluginManager) -> None:
        # Each hook implementation is called on its own so that one failing plugin is
        # reported and withdrawn while the others register.
        failed: set[str] = set()
        # pluggy lists implementations in call order (tryfirst/trylast move them); registration
        # must follow load order (core, first party, third party) so the first comer keeps a
        # name.
        rank = {name: i for i, name in enumerate(self._dists)}
        self._loading = True
        try:
            for _kind, (_base, hook) in KINDS.items():
                impls = sorted(getattr(pm.hook, hook).get_hookimpls(),
                               key=lambda impl: rank.get(impl.plugin_name, len(rank)))
                for impl in impls:
                    plugin = impl.plugin_name
                    if plugin in failed:
                        continue
                    self._plugin = (plugin, self._dists.get(plugin))
                    try:
                        impl.function(**{a: self for a in impl.argnames})
                    except KeyboardInterrupt:
                        raise
                    except BaseException as e:  # a plugin's bug (sys.exit too) must not end us
                        failed.add(plugin)
                        self._refuse(plugin, self._dists.get(plugin), e)
                    finally:
                        self._plugin = ("<direct>", None)
        finally:
            self._loading = False
        self._check_orders()

    def _check_orders(self) -> None:
        """Check the order each solver registered by a plugin declares with its default
        options (:func:`declared_order`). Its default instance is built only now, when every
        plugin's parts are in, and lookups by name (:func:`get_solver`) meanwhile use this
        registry: a solver whose default instance resolves another part by name (a wrapper's
        inner solver) registers as any other. A failure withdraws the plugin, as a failing
        hook does."""
        withdrawn: set[str] = set()
        token = _LOADING.set(self)
        try:
            for entry in self._unchecked:
                if entry.plugin in withdrawn:
                    continue
                try:
                    order = declared_order(entry.cls)
                    if not _valid_order(order):
                        raise RegistrationError(
                            _order_message(entry.plugin, entry.name, entry.cls, order))
                except KeyboardInterrupt:
                    raise
                except BaseException as e:
                    withdrawn.add(entry.plugin)
                    self._refuse(entry.plugin, entry.distribution, e)
        finally:
            _LOADING.reset(token)
            self._unchecked.clear()

    def _refuse(self, plugin: str, dist: str | None, error: BaseException) -> None:
        """Withdraw a plugin that failed while loading and report it under :attr:`broken`.
        solverlab's own parts failing is a bug to see, not to hide: ``error`` is re-raised."""
        if plugin == CORE_PLUGIN:
            raise error
        self._withdraw(plugin)
        self.broken.append(BrokenPlugin(plugin, dist, _describe(error)))

    def _refusal(self, ep: EntryPoint, dist: str | None) -> str | None:
        """Why the entry point ``ep`` may not load, or None."""
        if ep.name in self._dists:
            return (f"the plugin name {ep.name!r} is already taken by "
                    f"{_who(ep.name, self._dists[ep.name])}")
        if not _is_first_party(dist):
            module = ep.value.split(":")[0].split(".")[0].strip()
            for what, value in (("entry-point name", ep.name), ("module", module)):
                if _is_reserved(value):
                    return (f"the {what} {value!r} takes the prefix {RESERVED_PREFIX!r}, "
                            f"reserved for solverlab's own plugins (distribution "
                            f"{FIRST_PARTY!r}); rename it")
        return None

    def _check_hooks(self, pm: pluggy.PluginManager, plugin: object, name: str) -> None:
        """Report hook functions of ``plugin`` that would never be called."""
        specs = [n for n in dir(pm.hook) if n.startswith("solverlab_")
                 and getattr(pm.hook, n).has_spec()]
        unknown = {hc.name for hc in pm.get_hookcallers(plugin) or [] if not hc.has_spec()
                   and any(not i.optionalhook for i in hc.get_hookimpls() if i.plugin is plugin)}
        attrs_ = (vars(plugin) if inspect.ismodule(plugin)
                  else {a: inspect.getattr_static(plugin, a, None) for a in dir(plugin)})
        unmarked = {a for a, v in attrs_.items() if a.startswith("solverlab_") and callable(v)
                    and pm.parse_hookimpl_opts(plugin, a) is None}
        for hook in sorted(unknown | (unmarked - set(specs))):
            close = difflib.get_close_matches(hook, specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.broken.append(BrokenPlugin(name, self._dists.get(name), (
                f"RegistrationError: {hook!r} matches no hook specification{hint}, so it is never "
                f"called; the hooks are: {', '.join(specs)}")))
        for hook in sorted(unmarked & set(specs)):
            self.broken.append(BrokenPlugin(name, self._dists.get(name), (
                f"RegistrationError: {hook!r} is not marked @solverlab.hookimpl, so it is never "
                f"called")))

    @classmethod
    def load(
        cls,
        eps: Iterable[EntryPoint] | None = None,
        blocked: Iterable[str] | None = None,
    ) -> Registry:
        """A registry with the core parts plus every plugin of the ``solverlab`` entry-point group
        (or ``eps``), less the ``blocked`` names (default: from ``SOLVERLAB_BLOCK_PLUGINS``).
        First-party entry points load first, then the others in the order given."""
        from . import builtins

        reg = cls()
        pm = pluggy.PluginManager("solverlab")
        pm.add_hookspecs(hookspecs)
        pm.register(builtins, name=CORE_PLUGIN)
        reg._dists = {CORE_PLUGIN: FIRST_PARTY}
        if blocked is None:
            blocked = [b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()]
        blocked = set(blocked)
        eps = list(entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps)
        eps.sort(key=lambda ep: not _is_first_party(_dist(ep)))  # stable
        for ep in eps:
            dist = _dist(ep)
            if ep.name in blocked:
                reg.blocked.append(ep.name)
                continue
            why = reg._refusal(ep, dist)
            if why is not None:
                reg.broken.append(BrokenPlugin(ep.name, dist, f"RegistrationError: {why}"))
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # report, keep going (sys.exit() at import too)
                reg.broken.append(BrokenPlugin(ep.name, dist, _describe(e)))
                continue
            reg._dists[ep.name] = dist
            reg._check_hooks(pm, plugin, ep.name)
        reg.plugin_manager = pm
        reg._run_plugin_hooks(pm)
        return reg

    def add_commands(self, cli: Any) -> None:
        """Call ``solverlab_register_commands(cli)`` of every plugin (failures are reported)."""
        if self.plugin_manager is None:
            return
        for impl in self.plugin_manager.hook.solverlab_register_commands.get_hookimpls():
            try:
                impl.function(cli=cli)
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                self.broken.append(BrokenPlugin(impl.plugin_name,
                                                self._dists.get(impl.plugin_name), _describe(e)))

    # -- lookups ------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[_kind(kind)])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[_kind(kind)][n] for n in self.names(kind)]

    def entry(self, kind: str, name: str) -> Entry:
        """The entry of ``name``; an unknown name raises :class:`UnknownNameError` with close
        matches and the list of registered names."""
        table = self._entries[_kind(kind)]
        if isinstance(name, str) and name in table:
            return table[name]
        close = difflib.get_close_matches(str(name), list(table), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        broken = "".join(
            f"\n  (plugin {b.plugin!r} failed to load: {b.error})" for b in self.broken
        )
        raise UnknownNameError(
            f"unknown {kind} {name!r}{hint}. Registered {kind}s: "
            f"{', '.join(sorted(table)) or '(none)'}{broken}"
        )

    def create(self, kind: str, name: str, **options: Any) -> Any:
        """An instance of the part ``name`` built with ``options``; an option the part does not
        have raises :class:`OptionError` listing the ones it has."""
        cls = self.entry(kind, name).cls
        if attrs.has(cls):
            fields = [f for f in attrs.fields(cls) if f.init]
            allowed = [f.alias for f in fields]
            required = [f.alias for f in fields if f.default is attrs.NOTHING]
        else:
            try:
                params = list(inspect.signature(cls).parameters.values())
            except (TypeError, ValueError):  # no signature to check against
                return cls(**options)
            if any(p.kind is p.VAR_KEYWORD for p in params):
                return cls(**options)
            named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            allowed = [p.name for p in named]
            required = [p.name for p in named if p.default is p.empty]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise OptionError(
                f"{kind} {name!r} has no option {', '.join(repr(u) for u in unknown)}; "
                f"its options are: {', '.join(allowed) or '(none)'}"
            )
        missing = [r for r in required if r not in options]
        if missing:
            raise OptionError(
                f"{kind} {name!r} needs option {', '.join(repr(m) for m in missing)}; "
                f"its options are: {', '.join(allowed)}"
            )
        return cls(**options)


def declared_order(cls: type, **options: Any) -> Any:
    """The order a solver class declares for ``options`` (default: none): the
    :attr:`~solverlab.Solver.convergence_order` of ``cls(**options)``, the number
    ``solverlab list``, ``solverlab order`` and the conformance kit show and check. A class
    that cannot be built without options gives its static declaration
    (its class attribute ``order``)."""
    if not options and _needs_options(cls):
        return _static_order(cls)
    return cls(**options).convergence_order


def _order_message(plugin: str, name: str, cls: type, order: Any) -> str:
    return (f"plugin {plugin!r}: solver {name!r} ({cls.__qualname__}) must declare its "
            f"global order as an integer class attribute `order` >= 1 (and "
            f"`convergence_order` >= 1 with its default options); got {order!r}")


def _static_order(cls: type) -> Any:
    """The order ``cls`` declares without being built: an int class attribute ``order``, or
    the int default of an attrs option ``order``. Registration requires it; options may then
    change the order (:attr:`~solverlab.Solver.convergence_order`)."""
    if attrs.has(cls):
        field = getattr(attrs.fields(cls), "order", None)
        if field is not None:
            return field.default
    return getattr(cls, "order", None)


def _valid_order(order: Any) -> bool:
    return isinstance(order, int) and not isinstance(order, bool) and order >= 1


def _needs_options(cls: type) -> bool:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


def _kind(kind: str) -> str:
    k = kind[:-1] if kind.endswith("s") and kind[:-1] in KINDS else kind
    if k not in KINDS:
        raise OptionError(f"unknown kind {kind!r}; kinds are: {', '.join(KINDS)}")
    return k


def _who(plugin: str, dist: str | None) -> str:
    return f"plugin {plugin!r}" + (f" (distribution {dist!r})" if dist else "")


def _describe(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return (f"SystemExit: the plugin called sys.exit({e.code!r}); a plugin may not end "
                "the process")
    return f"{type(e).__name__}: {e}"


def _dist(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.name


def _is_first_party(dist: str | None) -> bool:
    return dist is not None and re.sub(r"[-_.]+", "-", dist).lower() == FIRST_PARTY


def _is_reserved(name: str) -> bool:
    n = re.sub(r"[-.]", "_", name).lower()
    return n == CORE_PLUGIN or n.startswith(RESERVED_PREFIX)


_REGISTRY: Registry | None = None
#: The registry whose plugins' default solvers are being built (:meth:`Registry._check_orders`).
_LOADING: contextvars.ContextVar[Registry | None] = contextvars.ContextVar(
    "solverlab_registry_loading", default=None)


def get_registry() -> Registry:
    """The process-wide registry, built on first use (while a registry checks its plugins'
    solvers, that registry)."""
    global _REGISTRY
    loading = _LOADING.get()
    if loading is not None:
        return loading
    if _REGISTRY is None:
        _REGISTRY = Registry.load()
    return _REGISTRY


def reset_registry(registry: Registry | None = None) -> None:
    """Forget the process-wide registry (or replace it); the next lookup rebuilds it."""
    global _REGISTRY
    _REGISTRY = registry


def get_solver(name: str, **options: Any) -> Solver:
    """The solver ``name`` with ``options``, e.g. ``get_solver("heun")``."""
    return get_registry().create("solver", name, **options)


def get_schedule(name: str, **options: Any) -> Schedule:
    """The schedule ``name``, e.g. ``get_schedule("vp-linear", beta_max=20.0)``."""
    return get_registry().create("schedule", name, **options)


def get_grid(name: str, **options: Any) -> Grid:
    """The grid rule ``name``: call it as ``grid(schedule, steps, t_start=None, t_end=None)``."""
    return get_registry().create("grid", name, **options)


def get_parameterization(name: str, **options: Any) -> Parameterization:
    return get_registry().create("parameterization", name, **options)


def get_model(name: str, **options: Any) -> Model:
    """A registered model built from options alone, e.g. ``get_model("gaussian-mixture",
    dim=4)``. ``solverlab.get_model`` also loads trained checkpoints by name or path
    (:func:`solverlab.checkpoint.get_model`)."""
    return get_registry().create("model", name, **options)


def get_objective(name: str, **options: Any) -> Objective:
    return get_registry().create("objective", name, **options)
