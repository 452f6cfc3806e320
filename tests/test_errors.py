"""The error hierarchy, and messages that name the option, the value and what is allowed."""

from __future__ import annotations

import attrs
import pytest
import torch

import solverlab
from solverlab import errors
from solverlab.errors import (
    DuplicateNameError,
    GridError,
    InputError,
    OptionError,
    RegistrationError,
    SolverDivergedError,
    SolverlabError,
    UnknownNameError,
)
from solverlab.grid import Custom, Karras, Leading, TimeUniform
from solverlab.model import Denoiser, Model, TorchModel
from solverlab.parameterization import Noise
from solverlab.registry import Registry
from solverlab.schedule import EDM, VE, VPCosine, VPDiscrete, VPLinear
from solverlab.validators import boolean, number, one_of


def test_every_error_is_a_solverlab_error_and_exported():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, SolverlabError)
        assert issubclass(cls, Exception)
        assert getattr(solverlab, name) is cls


@pytest.mark.parametrize(
    "cls, bases",
    [
        (OptionError, (ValueError,)),
        (GridError, (OptionError, ValueError)),
        (InputError, (ValueError,)),
        (UnknownNameError, (LookupError,)),
        (RegistrationError, (TypeError,)),
        (DuplicateNameError, (RegistrationError, TypeError)),
        (SolverDivergedError, (FloatingPointError, ArithmeticError)),
    ],
)
def test_errors_are_also_the_matching_builtin_errors(cls, bases):
    # so that `except ValueError` etc. in user code keeps working
    for b in bases:
        assert issubclass(cls, b)


def test_unknown_name_error_is_not_quoted_like_a_key_error():
    e = UnknownNameError("unknown grid 'x'")
    assert str(e) == "unknown grid 'x'"
    assert str(UnknownNameError()) == ""
    assert str(KeyError("a")) == "'a'"  # what LookupError subclasses would otherwise do


class _Dummy(Model):
    schedule = VPLinear()
    parameterization = Noise()

    def __call__(self, x, t, **cond):
        return x


def _grid_steps_zero():
    TimeUniform()(VPLinear(), 0)


def _unknown_option():
    Registry.load(eps=[], blocked=[]).create("grid", "karras", rhoo=3)


def _unknown_name():
    Registry.load(eps=[], blocked=[]).create("grid", "logsnrr")


def _bad_t_shape():
    Denoiser(_Dummy()).data(torch.zeros(3, 2), torch.zeros(2))


def _bad_x():
    from solverlab.solver import check_state

    check_state(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize(
    "make, err, words",
    [
        (lambda: VPLinear(beta_min=-1.0), OptionError,
         ["VPLinear", "'vp-linear'", "beta_min=-1.0", "not allowed", "a finite number > 0"]),
        (lambda: VPLinear(beta_max="x"), OptionError, ["beta_max='x'", "a finite number > 0"]),
        (lambda: VE(sigma_max=0.001), OptionError, ["sigma_max=0.001", "> sigma_min=0.01"]),
        (lambda: VPCosine(t_max=2.0), OptionError, ["t_max=2.0", "<= 1.0"]),
        (lambda: EDM(t_min=-1.0), OptionError, ["t_min=-1.0", "> 0"]),
        (lambda: VPDiscrete(betas=[0.5]), OptionError, ["betas", "holds 1 value", "at least 2"]),
        (lambda: Karras(rho=0), OptionError, ["Karras", "'karras'", "rho=0", "> 0"]),
        (lambda: Leading(offset=-2), OptionError, ["offset=-2", "an integer >= 0"]),
        (lambda: TorchModel(lambda x, t: x, VPLinear(), Noise(), time_input="sigma_t"),
         OptionError, ["time_input='sigma_t'", "'t', 'index', 'sigma'"]),
        (lambda: Denoiser(_Dummy(), threshold_ratio=2.0), OptionError,
         ["threshold_ratio=2.0", "(0, 1)"]),
        (lambda: Denoiser(object()), OptionError, ["model=<object", "TorchModel"]),
        (_grid_steps_zero, GridError, ["'time-uniform'", "steps=0", "integer >= 1"]),
        (lambda: Custom(times=[0.1, 0.2]), GridError, ["strictly decreasing", "0.1", "0.2"]),
        (_unknown_option, OptionError, ["'karras'", "'rhoo'", "its options are: rho"]),
        (_unknown_name, UnknownNameError, ["unknown grid 'logsnrr'", "did you mean 'logsnr'"]),
        (_bad_t_shape, InputError, ["shape (2,)", "(3, 2)", "a scalar or a tensor of shape (3,)"]),
        (_bad_x, InputError, ["1 NaN or infinite", "must be finite"]),
    ],
)
def test_messages_name_the_option_the_value_and_what_is_allowed(make, err, words):
    with pytest.raises(err) as e:
        make()
    assert isinstance(e.value, SolverlabError)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)


# -- the validators behind the options ---------------------------------------------------------


@attrs.frozen(kw_only=True)
class Opts:
    name = "opts"
    mode: str = attrs.field(default="a", validator=one_of("a", "b"))
    k: int = attrs.field(default=1, validator=number(ge=1, le=5, integer=True))
    x: float = attrs.field(default=0.5, validator=number(gt=0, lt=1))
    y: float | None = attrs.field(default=None, validator=number(ge=0, none="the default"))
    flag: bool = attrs.field(default=False, validator=boolean)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mode": "c"}, ["Opts ('opts')", "mode='c'", "choose one of 'a', 'b'"]),
        ({"k": 0}, ["k=0", "an integer >= 1 and <= 5"]),
        ({"k": 6}, ["k=6"]),
        ({"k": 2.0}, ["k=2.0", "an integer"]),
        ({"k": True}, ["k=True"]),
        ({"x": 1.0}, ["x=1.0", "a finite number > 0 and < 1"]),
        ({"x": float("nan")}, ["x=nan"]),
        ({"x": float("inf")}, ["x=inf"]),
        ({"x": False}, ["x=False"]),
        ({"x": None}, ["x=None", "a finite number > 0 and < 1"]),
        ({"y": -1.0}, ["y=-1.0", "a finite number >= 0, or None for the default"]),
        ({"y": "1"}, ["y='1'"]),
        ({"flag": 1}, ["flag=1", "True or False"]),
        ({"flag": "yes"}, ["flag='yes'", "True or False"]),
    ],
)
def test_validators_raise_option_errors_with_the_allowed_values(kwargs, words):
    with pytest.raises(OptionError) as e:
        Opts(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_validators_accept_good_values():
    o = Opts(mode="b", k=5, x=0.999, flag=True)
    assert (o.mode, o.k, o.x, o.flag) == ("b", 5, 0.999, True)
    assert Opts(k=1, x=1e-300).k == 1
    assert Opts(y=None).y is None and Opts(y=0.0).y == 0.0
