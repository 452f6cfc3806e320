"""The registry: lookups with options, close-match hints, validation in ``add``, duplicate
names, and plugin loading that survives broken plugins (fake entry points, plugin modules
written to tmp_path)."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from importlib.metadata import EntryPoint

import attrs
import pytest
import torch

import solverlab
from solverlab import hookspecs
from solverlab import registry as registry_mod
from solverlab.errors import (
    DuplicateNameError,
    OptionError,
    RegistrationError,
    SolverlabError,
    UnknownNameError,
)
from solverlab.grid import Grid, Karras, Leading, TimeUniform
from solverlab.model import Model
from solverlab.parameterization import Noise, Velocity
from solverlab.registry import BLOCK_ENV, KINDS, BrokenPlugin, Entry, Registry, reset_registry
from solverlab.schedule import VPDiscrete, VPLinear
from solverlab.solver import Solver
from solverlab.validators import number

CORE_NAMES = {
    "schedule": {"vp-linear", "vp-cosine", "vp-discrete", "ve", "edm"},
    "parameterization": {"noise", "data", "velocity", "score"},
    "grid": {"time-uniform", "time-quadratic", "logsnr", "karras", "exponential", "lu-lambdas",
             "beta", "polyexponential", "vp", "linspace", "leading", "trailing", "custom"},
}


@attrs.frozen(kw_only=True)
class Heun(Solver):
    """Heun's method in t (2 NFE per step); the test's own solver."""

    name = "heun"
    order = 2
    theta: float = attrs.field(default=1.0, validator=number(gt=0))

    def step(self, state):
        d, x, t, tn = state.denoiser, state.x, state.t, state.t_next
        h = (tn - t).to(x.dtype)
        k1 = d.drift(x, t)
        k2 = d.drift(x + h * k1, tn)
        return state.advance(x + 0.5 * h * (k1 + k2))


@pytest.fixture
def core():
    """The global registry holding the core parts only (no installed plugins)."""
    reg = Registry.load(eps=[], blocked=[])
    reset_registry(reg)
    yield reg
    reset_registry()


@pytest.fixture
def make_plugin(tmp_path, monkeypatch):
    """Write a plugin module to tmp_path and return an entry point for it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules: list[str] = []

    def make(source: str, ep_name: str) -> EntryPoint:
        mod = f"slt_plugin_{ep_name}_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(source))
        modules.append(mod)
        importlib.invalidate_caches()
        return EntryPoint(name=ep_name, value=mod, group="solverlab")

    yield make
    for mod in modules:
        sys.modules.pop(mod, None)


def _solver_plugin(solver_name: str, extra: str = "") -> str:
    return f'''
    import attrs
    import solverlab

    @attrs.frozen(kw_only=True)
    class MySolver(solverlab.Solver):
        name = "{solver_name}"
        order = 1

        def step(self, state):
            h = (state.t_next - state.t).to(state.x.dtype)
            return state.advance(state.x + h * state.denoiser.drift(state.x, state.t))

    @solverlab.hookimpl
    def solverlab_register_solvers(registry):
        registry.add(MySolver)
    ''' + textwrap.dedent(extra).replace("\n", "\n    ")


# -- lookups --------------------------------------------------------------------------------------


def test_core_parts_are_registered_under_their_canonical_names(core):
    for kind, names in CORE_NAMES.items():
        assert set(core.names(kind)) == names
        for e in core.entries(kind):
            assert isinstance(e, Entry)
            assert (e.kind, e.plugin, e.distribution) == (kind, "solverlab", "solverlab")
            assert e.cls.name == e.name
    assert core.broken == [] and core.blocked == []


def test_lookups_return_instances_with_options(core):
    s = solverlab.get_schedule("vp-linear", beta_max=10.0)
    assert isinstance(s, VPLinear) and s.beta_max == 10.0 and s.beta_min == 0.1
    d = solverlab.get_schedule("vp-discrete", betas=torch.linspace(1e-3, 0.2, 50))
    assert isinstance(d, VPDiscrete) and d.num_train_timesteps == 50
    k = solverlab.get_grid("karras", rho=3.0)
    assert isinstance(k, Karras) and k.rho == 3.0
    assert solverlab.get_grid("karras").rho == 7.0
    lead = solverlab.get_grid("leading", offset=1)
    assert isinstance(lead, Leading) and lead.offset == 1
    assert isinstance(solverlab.get_grid("time-uniform"), TimeUniform)
    c = solverlab.get_grid("custom", times=[0.9, 0.5, 0.1])
    assert c(VPLinear()).tolist() == [0.9, 0.5, 0.1]
    assert isinstance(solverlab.get_parameterization("velocity"), Velocity)
    assert isinstance(solverlab.get_parameterization("noise"), Noise)
    # a value rejected by the part's validator is an OptionError too
    with pytest.raises(OptionError, match="rho=-1"):
        solverlab.get_grid("karras", rho=-1)


def test_get_solver_returns_an_instance_with_options(core):
    core.add(Heun)
    h = solverlab.get_solver("heun", theta=0.5)
    assert isinstance(h, Heun) and h.theta == 0.5 and h.order == 2
    assert solverlab.get_solver("heun").theta == 1.0


@pytest.mark.parametrize(
    "lookup, name, close",
    [
        (solverlab.get_grid, "logsnrr", "logsnr"),
        (solverlab.get_grid, "karas", "karras"),
        (solverlab.get_schedule, "vp-linaer", "vp-linear"),
        (solverlab.get_schedule, "vpcosine", "vp-cosine"),
        (solverlab.get_parameterization, "veloctiy", "velocity"),
    ],
)
def test_unknown_name_mentions_close_matches(core, lookup, name, close):
    with pytest.raises(UnknownNameError) as e:
        lookup(name)
    msg = str(e.value)
    assert repr(name) in msg
    hint, registered = msg.split("Registered")
    assert "did you mean" in hint and repr(close) in hint
    assert close in registered
    assert not msg.startswith('"')  # not quoted like a KeyError
    assert isinstance(e.value, LookupError) and isinstance(e.value, SolverlabError)


def test_unknown_name_without_close_match_lists_the_registered_names(core):
    with pytest.raises(UnknownNameError) as e:
        solverlab.get_grid("zzzzzz")
    msg = str(e.value)
    assert "did you mean" not in msg
    for n in CORE_NAMES["grid"]:
        assert n in msg


def test_unknown_solver_in_a_fresh_registry_mentions_heun():
    reg = Registry()
    reg.add(Heun)
    with pytest.raises(UnknownNameError, match=r"did you mean 'heun'"):
        reg.entry("solver", "huen")
    with pytest.raises(UnknownNameError, match=r"'heun'"):
        reg.create("solver", "huen")
    assert reg.create("solver", "heun", theta=2.0).theta == 2.0
    with pytest.raises(UnknownNameError, match=r"\(none\)"):
        reg.entry("grid", "logsnr")  # a fresh Registry has no core parts


def test_get_solver_unknown_name_through_the_global_registry(core):
    core.add(Heun)
    with pytest.raises(UnknownNameError, match=r"did you mean 'heun'"):
        solverlab.get_solver("huen")


@pytest.mark.parametrize(
    "lookup, name, opts, allowed",
    [
        (solverlab.get_grid, "karras", {"rhoo": 3}, ["rho"]),
        (solverlab.get_schedule, "vp-linear", {"beta_mim": 1.0},
         ["beta_min", "beta_max", "t_min", "t_max"]),
        (solverlab.get_grid, "custom", {"times_": [0.9, 0.1]}, ["times"]),
        (solverlab.get_parameterization, "noise", {"foo": 1}, ["(none)"]),
        (solverlab.get_solver, "heun", {"thetaa": 1.0, "zeta": 2}, ["theta"]),
    ],
)
def test_unknown_option_lists_the_options(core, lookup, name, opts, allowed):
    core.add(Heun)
    with pytest.raises(OptionError) as e:
        lookup(name, **opts)
    msg = str(e.value)
    assert f"{name!r}" in msg
    for o in opts:
        assert repr(o) in msg
    for a in allowed:
        assert a in msg.split("its options are:")[1]


def test_a_missing_required_option_is_an_option_error(core):
    # `custom` needs `times`; the lookup must say so, not leak the constructor's TypeError
    with pytest.raises(OptionError, match="times"):
        solverlab.get_grid("custom")


def test_unknown_option_of_a_part_that_is_not_an_attrs_class_is_an_option_error(core):
    class Sized(Model):
        name = "sized"

        def __init__(self, dim: int = 2, *, scale: float = 1.0):
            self.schedule, self.parameterization = VPLinear(), Noise()
            self.dim, self.scale = dim, scale

        def __call__(self, x, t, **cond):
            return x

    core.add(Sized)
    assert solverlab.get_model("sized", dim=4, scale=2.0).dim == 4
    with pytest.raises(OptionError) as e:
        solverlab.get_model("sized", dimm=4)
    msg = str(e.value)
    assert "'dimm'" in msg and "dim" in msg and "scale" in msg


def test_kinds_accept_plurals_and_refuse_unknown_kinds(core):
    assert core.names("grids") == core.names("grid")
    with pytest.raises(OptionError, match="unknown kind 'widget'") as e:
        core.names("widget")
    for k in KINDS:
        assert k in str(e.value)


# -- add() validation ------------------------------------------------------------------------------


def _step(self, state):
    return state.advance(state.x)


def test_add_refuses_an_abstract_class():
    @attrs.frozen(kw_only=True)
    class Abstract(Solver):
        name = "abstract"
        order = 1

    reg = Registry()
    with pytest.raises(RegistrationError, match=r"abstract \(implement step\)"):
        reg.add(Abstract)

    class HalfGrid(Grid):
        name = "half"

    with pytest.raises(RegistrationError, match="abstract"):
        reg.add(HalfGrid)
    with pytest.raises(RegistrationError, match="abstract"):
        reg.add(Solver)
    assert reg.names("solver") == [] and reg.names("grid") == []


@pytest.mark.parametrize("bad", [type("Foo", (), {"name": "foo", "order": 1}), dict, int])
def test_add_refuses_a_non_solverlab_class(bad):
    with pytest.raises(RegistrationError, match="not a subclass of any of Solver, Schedule"):
        Registry().add(bad)


def test_add_refuses_an_instance():
    with pytest.raises(RegistrationError, match="takes a class"):
        Registry().add(Heun())


@pytest.mark.parametrize("order", [None, 0, -1, True, 1.5, "2"])
def test_add_refuses_a_solver_without_an_integer_order(order):
    ns = {"name": "no-order", "step": _step}
    if order is not None:
        ns["order"] = order
    cls = attrs.frozen(kw_only=True)(type("NoOrder", (Solver,), ns))
    with pytest.raises(RegistrationError) as e:
        Registry().add(cls)
    assert "order" in str(e.value) and "'no-order'" in str(e.value)
    assert f"got {order!r}" in str(e.value)


def test_add_accepts_an_attrs_option_order_with_an_int_default():
    @attrs.frozen(kw_only=True)
    class Family(Solver):
        name = "family"
        order: int = attrs.field(default=2, validator=number(ge=1, le=3, integer=True))

        def step(self, state):
            return state.advance(state.x)

    reg = Registry()
    reg.add(Family)
    assert reg.create("solver", "family").order == 2
    assert reg.create("solver", "family", order=3).convergence_order == 3
    with pytest.raises(OptionError, match="order=4"):
        reg.create("solver", "family", order=4)


def test_the_declared_order_is_the_convergence_order_of_the_built_solver():
    # The class attribute `order` only has to exist; what is reported (list, order, the kit)
    # is what an instance says for its options.
    @attrs.frozen(kw_only=True)
    class Corrected(Solver):
        name = "corrected"
        order = 1
        corrector: bool = attrs.field(default=True)

        @property
        def convergence_order(self):
            return self.order + self.corrector

        def step(self, state):
            return state.advance(state.x)

    @attrs.frozen(kw_only=True)
    class NeedsOption(Solver):
        name = "needs-option"
        order = 2
        theta: float

        def step(self, state):
            return state.advance(state.x)

    reg = Registry()
    reg.add(Corrected)
    reg.add(NeedsOption)
    assert registry_mod.declared_order(Corrected) == 2
    assert registry_mod.declared_order(Corrected, corrector=False) == 1
    # no default instance: the class's own declaration
    assert registry_mod.declared_order(NeedsOption) == 2
    assert registry_mod.declared_order(NeedsOption, theta=0.5) == 2


@pytest.mark.parametrize("order", [0, None, 2.0])
def test_add_refuses_a_solver_whose_default_convergence_order_is_not_an_integer(order):
    cls = attrs.frozen(kw_only=True)(type("BadProperty", (Solver,), {
        "name": "bad-property", "order": 2, "step": _step,
        "convergence_order": property(lambda self: order),
    }))
    with pytest.raises(RegistrationError, match=rf"'bad-property'.*got {order!r}"):
        Registry().add(cls)


@pytest.mark.parametrize("default", [attrs.NOTHING, 0, 1.5, True, None, attrs.Factory(lambda: 2)])
def test_add_refuses_an_attrs_option_order_without_an_int_default(default):
    cls = attrs.frozen(kw_only=True)(type("BadFamily", (Solver,), {
        "__annotations__": {"order": int},
        "order": attrs.field(default=default),
        "name": "bad-family",
        "step": _step,
    }))
    with pytest.raises(RegistrationError, match="order"):
        Registry().add(cls)


@pytest.mark.parametrize("name", [None, "", "two words", 3])
def test_add_refuses_a_missing_or_bad_name(name):
    ns = {"order": 1, "step": _step}
    if name is not None:
        ns["name"] = name
    cls = attrs.frozen(kw_only=True)(type("Nameless", (Solver,), ns))
    with pytest.raises(RegistrationError, match="needs a name"):
        Registry().add(cls)


def test_add_returns_the_entry_and_takes_an_alias():
    reg = Registry()
    e = reg.add(Heun)
    assert (e.kind, e.name, e.cls, e.plugin) == ("solver", "heun", Heun, "<direct>")
    assert reg.add(Heun, name="heun-alias").name == "heun-alias"
    assert reg.names("solver") == ["heun", "heun-alias"]
    # a Model without a name cannot be registered, a named one can
    with pytest.raises(RegistrationError, match="needs a name"):
        reg.add(solverlab.TorchModel)

    class Named(Model):
        name = "named"

        def __call__(self, x, t, **cond):
            return x

    assert reg.add(Named).kind == "model"


def test_duplicate_names_raise_naming_both_plugins():
    @attrs.frozen(kw_only=True)
    class Heun2(Heun):
        pass

    reg = Registry()
    reg._plugin = ("first", "dist-a")
    reg.add(Heun)
    reg._plugin = ("second", "dist-b")
    with pytest.raises(DuplicateNameError) as e:
        reg.add(Heun2)
    msg = str(e.value)
    assert "solver 'heun' is registered by two plugins" in msg
    assert "'first'" in msg and "'second'" in msg and "dist-a" in msg and "dist-b" in msg
    assert BLOCK_ENV in msg
    assert isinstance(e.value, RegistrationError)
    reg._plugin = ("<direct>", None)


def test_adding_a_name_twice_directly_says_so():
    """Two registry.add() calls outside any plugin (a notebook cell run twice): no talk of
    two plugins or of blocking one."""
    @attrs.frozen(kw_only=True)
    class Heun2(Heun):
        pass

    reg = Registry()
    reg.add(Heun)
    with pytest.raises(DuplicateNameError) as e:
        reg.add(Heun2)
    msg = str(e.value)
    assert "solver 'heun' is already registered (Heun, by plugin '<direct>')" in msg
    assert "called twice" in msg and BLOCK_ENV not in msg
    assert isinstance(e.value, RegistrationError)
    assert reg.entry("solver", "heun").cls is Heun  # the first one stays
    # the same name in another kind is no clash
    reg.add(type("HeunGrid", (TimeUniform,), {"name": "heun"}))
    assert reg.names("grid") == ["heun"]


# -- loading plugins -------------------------------------------------------------------------------


BROKEN_EP = EntryPoint(name="broken", value="slt_no_such_module_xyz", group="solverlab")


def test_a_plugin_that_fails_to_import_is_reported_and_the_core_works():
    reg = Registry.load(eps=[BROKEN_EP], blocked=[])
    assert [b.plugin for b in reg.broken] == ["broken"]
    b = reg.broken[0]
    assert isinstance(b, BrokenPlugin)
    assert "ModuleNotFoundError" in b.error and "slt_no_such_module_xyz" in b.error
    for kind, names in CORE_NAMES.items():
        assert set(reg.names(kind)) == names
    s = reg.create("schedule", "vp-linear")
    g = reg.create("grid", "logsnr")(s, 5)
    assert g.shape == (6,)
    # an unknown-name error points at the broken plugin
    with pytest.raises(UnknownNameError, match=r"plugin 'broken' failed to load"):
        reg.entry("solver", "dpmpp-2m")


def test_the_global_registry_survives_a_broken_plugin(core, monkeypatch):
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: [BROKEN_EP])
    reset_registry()
    assert isinstance(solverlab.get_schedule("ve"), solverlab.Schedule)
    assert [b.plugin for b in solverlab.get_registry().broken] == ["broken"]


def test_a_plugin_whose_import_raises_is_reported(make_plugin):
    ep = make_plugin("raise RuntimeError('kaput at import')\n", "kaput")
    reg = Registry.load(eps=[ep], blocked=[])
    assert len(reg.broken) == 1
    assert reg.broken[0].plugin == "kaput"
    assert reg.broken[0].error == "RuntimeError: kaput at import"


WRAPPER_PLUGIN = """
import attrs
import solverlab

@attrs.frozen(kw_only=True)
class Wrapper(solverlab.Solver):
    \"\"\"Runs a solver looked up by name when it is built (as teleport and preset do).\"\"\"
    name = "wrapper"
    order = 1
    inner: str = "my-euler-late"
    _solver: object = attrs.field(init=False, default=None)

    def __attrs_post_init__(self):
        object.__setattr__(self, "_solver", solverlab.get_solver(self.inner))

    @property
    def convergence_order(self):
        return self._solver.convergence_order + 1  # visible: not the static order

    def step(self, state):
        return self._solver.step(state)

@solverlab.hookimpl
def solverlab_register_solvers(registry):
    registry.add(Wrapper)
"""


def test_a_solver_that_looks_up_another_by_name_registers(make_plugin):
    """Its default instance is built once every plugin's parts are in (the inner solver's
    plugin loads after it here), with lookups answered by the registry being loaded."""
    wrapper = make_plugin(WRAPPER_PLUGIN, "wrapper")
    late = make_plugin(_solver_plugin("my-euler-late"), "late")
    reg = Registry.load(eps=[wrapper, late], blocked=[])
    assert reg.broken == []
    assert reg.names("solver")[-2:] == ["my-euler-late", "wrapper"]
    assert registry_mod._LOADING.get() is None  # lookups go to the global registry again
    reset_registry(reg)
    try:
        assert registry_mod.declared_order(reg.entry("solver", "wrapper").cls) == 2
    finally:
        reset_registry()


def test_a_default_solver_that_cannot_be_built_withdraws_its_plugin(make_plugin):
    lonely = make_plugin(WRAPPER_PLUGIN, "lonely")  # its inner solver is not registered
    ok = make_plugin(_solver_plugin("my-euler"), "ok")
    reg = Registry.load(eps=[lonely, ok], blocked=[])
    assert [b.plugin for b in reg.broken] == ["lonely"]
    assert "unknown solver 'my-euler-late'" in reg.broken[0].error
    assert "wrapper" not in reg.names("solver") and "my-euler" in reg.names("solver")


def test_a_plugin_solver_with_a_bad_default_order_is_refused(make_plugin):
    bad = make_plugin(WRAPPER_PLUGIN.replace("+ 1  # visible", "* 0  # zero"), "zero")
    late = make_plugin(_solver_plugin("my-euler-late"), "late")
    reg = Registry.load(eps=[bad, late], blocked=[])
    assert [b.plugin for b in reg.broken] == ["zero"]
    assert "solver 'wrapper'" in reg.broken[0].error and "got 0" in reg.broken[0].error
    assert "wrapper" not in reg.names("solver") and "my-euler-late" in reg.names("solver")


def test_a_plugin_module_registers_through_its_hook(make_plugin):
    ep = make_plugin(_solver_plugin("my-euler"), "myplug")
    reg = Registry.load(eps=[ep], blocked=[])
    assert reg.broken == []
    e = reg.entry("solver", "my-euler")
    assert (e.plugin, e.distribution, e.cls.order) == ("myplug", None, 1)
    solver = reg.create("solver", "my-euler")
    # it solves like any solver
    from solverlab.model import Denoiser

    class Zero(Model):
        schedule = VPLinear()
        parameterization = Noise()

        def __call__(self, x, t, **cond):
            return torch.zeros_like(x)

    d = Denoiser(Zero())
    sol = solver.solve(d, torch.ones(2, 3, dtype=torch.float64), [1.0, 0.5])
    # eps = 0: dx/dt = dlog_alpha/dt x, one Euler step
    want = 1.0 + 0.5 * -float(VPLinear().dlog_alpha_dt(1.0))
    torch.testing.assert_close(sol.x, torch.full((2, 3), want, dtype=torch.float64))
    assert sol.nfe == 1


def test_plugins_are_loaded_lazily_by_the_global_registry(core, make_plugin, monkeypatch):
    ep = make_plugin(_solver_plugin("lazy-euler"), "lazyplug")
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return [ep]

    monkeypatch.setattr(registry_mod, "entry_points", fake_entry_points)
    reset_registry()
    assert calls == []  # nothing loaded until the first lookup
    assert solverlab.get_solver("lazy-euler").order == 1
    assert calls == ["solverlab"]
    solverlab.get_grid("logsnr")
    assert calls == ["solverlab"]  # built once
    assert solverlab.get_registry().entry("solver", "lazy-euler").plugin == "lazyplug"


def test_a_plugin_whose_hook_raises_is_withdrawn_and_reported(make_plugin):
    bad = make_plugin(_solver_plugin("half-euler", '''
        @solverlab.hookimpl
        def solverlab_register_grids(registry):
            raise RuntimeError("boom in grids")
        '''), "halfplug")
    good = make_plugin(_solver_plugin("good-euler"), "goodplug")
    reg = Registry.load(eps=[bad, good], blocked=[])
    broken = [(b.plugin, b.error) for b in reg.broken]
    assert broken == [("halfplug", "RuntimeError: boom in grids")]
    assert "half-euler" not in reg.names("solver")  # its solver was withdrawn
    assert reg.names("solver") == ["good-euler"]
    assert set(reg.names("grid")) == CORE_NAMES["grid"]


def test_a_plugin_registering_an_invalid_class_is_reported(make_plugin):
    ep = make_plugin('''
        import attrs
        import solverlab

        @attrs.frozen(kw_only=True)
        class NoOrder(solverlab.Solver):
            name = "no-order"

            def step(self, state):
                return state.advance(state.x)

        @solverlab.hookimpl
        def solverlab_register_solvers(registry):
            registry.add(NoOrder)
        ''', "noorder")
    reg = Registry.load(eps=[ep], blocked=[])
    assert len(reg.broken) == 1
    err = reg.broken[0].error
    assert err.startswith("RegistrationError:")
    assert "plugin 'noorder'" in err and "order" in err
    assert reg.names("solver") == []


def test_duplicate_names_across_plugins_name_both_plugins(make_plugin):
    a = make_plugin(_solver_plugin("dup-euler"), "plug_a")
    b = make_plugin(_solver_plugin("dup-euler", '''
        @solverlab.hookimpl
        def solverlab_register_grids(registry):
            registry.add(type("BGrid", (solverlab.grid.TimeUniform,), {"name": "b-grid"}))
        '''), "plug_b")
    reg = Registry.load(eps=[a, b], blocked=[])
    assert len(reg.broken) == 1
    err = reg.broken[0].error
    assert err.startswith("DuplicateNameError:")
    assert "'dup-euler'" in err and "'plug_a'" in err and "'plug_b'" in err
    # the first comer (load order) keeps the name; the clash refuses only the clashing part
    assert reg.broken[0].plugin == "plug_b"
    assert reg.entry("solver", "dup-euler").plugin == "plug_a"
    assert reg.entry("grid", "b-grid").plugin == "plug_b"


def test_a_plugin_clashing_with_a_core_name_is_the_one_withdrawn(make_plugin):
    ep = make_plugin('''
        import solverlab
        from solverlab.schedule import VPLinear

        class MyVP(VPLinear):
            pass

        @solverlab.hookimpl
        def solverlab_register_schedules(registry):
            registry.add(MyVP)
        ''', "clash")
    reg = Registry.load(eps=[ep], blocked=[])
    assert [b.plugin for b in reg.broken] == ["clash"]
    err = reg.broken[0].error
    assert "plugin 'solverlab' (distribution 'solverlab')" in err and "plugin 'clash'" in err
    assert reg.entry("schedule", "vp-linear").cls is VPLinear


@pytest.mark.parametrize("marker", ["trylast=True", "tryfirst=True", ""])
def test_a_plugin_clashing_with_a_core_name_never_withdraws_the_core(make_plugin, marker):
    # pluggy orders hook implementations by tryfirst/trylast; the registry must still let the
    # part registered first (the core, then entry points in order) win, so that a clash
    # withdraws the newcomer and never the whole core plugin.
    ep = make_plugin(f'''
        import solverlab
        from solverlab.schedule import VPLinear

        class MyVP(VPLinear):
            pass

        @solverlab.hookimpl({marker})
        def solverlab_register_schedules(registry):
            registry.add(MyVP)
        ''', "clash2")
    reg = Registry.load(eps=[ep], blocked=[])
    assert [b.plugin for b in reg.broken] == ["clash2"]
    assert reg.entry("schedule", "vp-linear").cls is VPLinear
    for kind, names in CORE_NAMES.items():
        assert set(reg.names(kind)) == names


def test_entry_point_names_must_be_unique(make_plugin):
    ep = make_plugin(_solver_plugin("first-euler"), "same")
    ep2 = make_plugin(_solver_plugin("second-euler"), "same")
    core_name = make_plugin(_solver_plugin("third-euler"), "solverlab")
    reg = Registry.load(eps=[ep, ep2, core_name], blocked=[])
    assert reg.names("solver") == ["first-euler"]
    assert [b.plugin for b in reg.broken] == ["same", "solverlab"]
    assert all("already taken" in b.error for b in reg.broken)


# -- blocking --------------------------------------------------------------------------------------


def test_blocked_plugins_are_not_loaded(make_plugin):
    good = make_plugin(_solver_plugin("blocked-euler"), "good")
    reg = Registry.load(eps=[good, BROKEN_EP], blocked=["good", "broken"])
    assert reg.blocked == ["good", "broken"]
    assert reg.broken == []  # not even imported
    assert good.value not in sys.modules
    assert reg.names("solver") == []
    assert set(reg.names("schedule")) == CORE_NAMES["schedule"]


def test_blocked_plugins_from_the_environment(make_plugin, monkeypatch):
    good = make_plugin(_solver_plugin("env-euler"), "envgood")
    other = make_plugin(_solver_plugin("other-euler"), "other")
    monkeypatch.setenv(BLOCK_ENV, " envgood , broken,, ")
    reg = Registry.load(eps=[good, BROKEN_EP, other])
    assert reg.blocked == ["envgood", "broken"]
    assert reg.broken == []
    assert reg.names("solver") == ["other-euler"]
    # an explicit list wins over the environment
    reg = Registry.load(eps=[good, other], blocked=[])
    assert reg.blocked == [] and reg.names("solver") == ["env-euler", "other-euler"]


def test_the_global_registry_honours_the_block_variable(core, make_plugin, monkeypatch):
    ep = make_plugin(_solver_plugin("env2-euler"), "env2")
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: [ep])
    monkeypatch.setenv(BLOCK_ENV, "env2")
    reset_registry()
    with pytest.raises(UnknownNameError):
        solverlab.get_solver("env2-euler")
    assert solverlab.get_registry().blocked == ["env2"]


# -- commands hook and hook specifications ---------------------------------------------------------


def test_commands_hook_is_called_with_the_cli_and_failures_are_reported(make_plugin):
    ok = make_plugin('''
        import solverlab

        @solverlab.hookimpl
        def solverlab_register_commands(cli):
            cli.add_command("hello")
        ''', "cmdok")
    bad = make_plugin('''
        import solverlab

        @solverlab.hookimpl
        def solverlab_register_commands(cli):
            raise ValueError("no cli for you")
        ''', "cmdbad")
    reg = Registry.load(eps=[ok, bad], blocked=[])
    assert reg.broken == []

    class FakeCLI:
        def __init__(self):
            self.commands = []

        def add_command(self, c):
            self.commands.append(c)

    cli = FakeCLI()
    reg.add_commands(cli)
    assert cli.commands == ["hello"]
    assert [(b.plugin, b.error) for b in reg.broken] == [("cmdbad", "ValueError: no cli for you")]
    Registry().add_commands(cli)  # no plugin manager: nothing to do
    assert cli.commands == ["hello"]


def test_every_kind_has_a_documented_hook():
    for _kind, (base, hook) in KINDS.items():
        spec = getattr(hookspecs, hook)
        assert spec.__doc__
        assert "registry.add" in spec.__doc__ or base.__name__ in spec.__doc__
        assert hook.startswith("solverlab_register_")
    assert hookspecs.solverlab_register_commands.__doc__
    assert solverlab.hookimpl is hookspecs.hookimpl
    assert hookspecs.hookimpl.project_name == "solverlab"
    reg = Registry.load(eps=[], blocked=[])
    pm = reg.plugin_manager
    assert pm is not None and pm.get_plugin("solverlab") is not None
    for _kind, (_base, hook) in KINDS.items():
        assert hasattr(pm.hook, hook)


# -- first party first; what a plugin may not do ---------------------------------------------------


def _distribution(tmp_path, dist: str, eps: dict[str, str]):
    info = tmp_path / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[solverlab]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return list(importlib.metadata.PathDistribution(info).entry_points)


def test_first_party_entry_points_load_first_and_keep_their_names(make_plugin, tmp_path):
    third = make_plugin(_solver_plugin("clash-euler", '''
        @solverlab.hookimpl
        def solverlab_register_grids(registry):
            registry.add(type("TGrid", (solverlab.grid.TimeUniform,), {"name": "third-grid"}))
        '''), "third")
    first = make_plugin(_solver_plugin("clash-euler"), "solverlab_first")
    (third_ep,) = _distribution(tmp_path, "third_dist", {"third": third.value})
    (first_ep,) = _distribution(tmp_path, "solverlab", {"solverlab_first": first.value})
    reg = Registry.load(eps=[third_ep, first_ep], blocked=[])  # third party found first
    assert reg.entry("solver", "clash-euler").plugin == "solverlab_first"
    assert reg.entry("grid", "third-grid").plugin == "third"  # only the clashing part refused
    (b,) = reg.broken
    assert (b.plugin, b.distribution) == ("third", "third_dist")
    assert "'solverlab_first' (distribution 'solverlab')" in b.error


def test_the_reserved_prefix_binds_third_parties_only(make_plugin, tmp_path):
    mod = make_plugin(_solver_plugin("prefixed-euler"), "x").value
    (ep,) = _distribution(tmp_path, "Solverlab", {"solverlab_mine": mod})  # normalized name
    assert Registry.load(eps=[ep], blocked=[]).names("solver") == ["prefixed-euler"]
    for name in ("solverlab_mine", "Solverlab-Mine", "solverlab"):
        reg = Registry.load(eps=[EntryPoint(name=name, value=mod, group="solverlab")],
                            blocked=[])
        assert reg.names("solver") == [] and len(reg.broken) == 1, name


def test_a_plugin_exiting_is_reported_and_keyboard_interrupt_propagates(make_plugin):
    at_import = make_plugin("import sys\nsys.exit(2)\n", "exits")
    in_hook = make_plugin('''
        import solverlab

        @solverlab.hookimpl
        def solverlab_register_grids(registry):
            raise SystemExit
        ''', "exits_later")
    good = make_plugin(_solver_plugin("still-here"), "good")
    reg = Registry.load(eps=[at_import, in_hook, good], blocked=[])
    assert [(b.plugin, b.error.split(";")[0]) for b in reg.broken] == [
        ("exits", "SystemExit: the plugin called sys.exit(2)"),
        ("exits_later", "SystemExit: the plugin called sys.exit(None)")]
    assert reg.names("solver") == ["still-here"]
    interrupt = make_plugin("raise KeyboardInterrupt\n", "ctrl_c")
    with pytest.raises(KeyboardInterrupt):
        Registry.load(eps=[interrupt], blocked=[])


def test_hooks_that_would_never_be_called_are_reported(make_plugin):
    ep = make_plugin(_solver_plugin("kept-euler", '''
        @solverlab.hookimpl
        def solverlab_register_grid(registry):
            pass

        def solverlab_register_schedules(registry):
            pass

        @solverlab.hookimpl(optionalhook=True)
        def solverlab_future_hook(registry):
            pass

        solverlab_setting = 3  # not a function
        '''), "careless")
    reg = Registry.load(eps=[ep], blocked=[])
    errors = sorted(b.error for b in reg.broken)
    assert len(errors) == 2, errors
    assert "'solverlab_register_grid' matches no hook" in errors[0]
    assert "did you mean 'solverlab_register_grids'" in errors[0]
    assert "'solverlab_register_schedules' is not marked @solverlab.hookimpl" in errors[1]
    assert reg.names("solver") == ["kept-euler"]
