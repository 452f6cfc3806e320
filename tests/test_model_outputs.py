"""Model outputs are checked once, where they enter (the Denoiser): every solver family sees
either a tensor shaped like ``x`` in its dtype or a ModelOutputError that says what is wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import solverlab
from solverlab.errors import ModelOutputError

FAMILIES = ["ddim", "dpmpp-2m", "dpmpp-2s", "dpm-solver-3", "unipc", "deis", "heun", "rk4",
            "pndm-plms", "pndm-prk", "torchdiffeq-dopri5", "torchdiffeq-rk4", "dpm-adaptive"]

SHAPE = (2, 3, 2, 2)  # (batch, channels, height, width)


@dataclasses.dataclass
class SampleOutput:
    """Stands in for diffusers' ``UNet2DOutput`` (a BaseOutput with ``.sample``)."""

    sample: torch.Tensor


class Net(nn.Module):
    """A real network (trainable parameters) whose output is bent into ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 6, 1)

    def forward(self, x, t):
        y = torch.tanh(self.conv(x)) * 0.1 + 0.01 * t.view(-1, 1, 1, 1)
        eps = y[:, :3]
        return {
            "ok": lambda: eps,
            "channel-1": lambda: eps[:, :1],
            "scalar": lambda: eps.mean(),
            "no-batch": lambda: eps[0],
            "learned-sigma": lambda: y,
            "tuple2": lambda: (eps, y),
            "tuple1": lambda: (eps,),
            "sample-output": lambda: SampleOutput(eps),
            "none": lambda: None,
            "float64": lambda: eps.double(),
            "int": lambda: eps.round().long(),
        }[self.kind]()


def _solve(name: str, kind: str, dtype=torch.float32, **model_options):
    model = solverlab.TorchModel(Net(kind).to(dtype), "vp-linear", **model_options)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    grid = solverlab.get_grid("logsnr")(model.schedule, 3)
    return solverlab.get_solver(name).solve(model, x, grid)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("kind", "says"), [
    ("channel-1", "never broadcast"),
    ("scalar", "scalar"),
    ("no-batch", "batch dimension is missing"),
    ("learned-sigma", "output_channels=3"),
    ("tuple2", "tuple of 2"),
    ("none", "None"),
    ("int", "floating-point"),
])
def test_a_bad_output_is_a_clear_error_in_every_solver_family(name, kind, says):
    with pytest.raises(ModelOutputError) as info:
        _solve(name, kind)
    message = str(info.value)
    assert says in message
    assert "TorchModel(Net" in message  # names the model
    if kind not in ("none", "tuple2", "int"):
        assert str(SHAPE) in message  # the expected shape


@pytest.mark.parametrize("name", FAMILIES)
def test_wrapped_outputs_and_other_dtypes_are_taken_as_the_plain_output(name):
    plain = _solve(name, "ok").x
    for kind in ("tuple1", "sample-output"):
        assert torch.equal(_solve(name, kind).x, plain)
    # A float64 output for float32 x is cast to x's dtype where it enters.
    out = _solve(name, "float64")
    assert out.x.dtype == torch.float32
    assert torch.allclose(out.x, plain, rtol=1e-5, atol=1e-6)
    # Learned-sigma channels: the first C are the prediction, as diffusers takes them.
    assert torch.equal(_solve(name, "learned-sigma", output_channels=3).x, plain)


def test_diffusers_unet_output_is_unwrapped():
    unet_2d = pytest.importorskip("diffusers.models.unets.unet_2d")
    output = unet_2d.UNet2DOutput(sample=torch.zeros(SHAPE))
    model = solverlab.TorchModel(lambda x, t: output, "vp-linear")
    den = solverlab.Denoiser(model)
    assert torch.equal(den(torch.ones(SHAPE), 0.5), output.sample)


def test_guided_outputs_are_checked_on_the_doubled_batch():
    model = solverlab.TorchModel(Net("channel-1"), "vp-linear")
    den = solverlab.Denoiser(model, cond={}, uncond={}, guidance_scale=2.0)
    with pytest.raises(ModelOutputError, match=r"\(4, 3, 2, 2\)"):
        den(torch.zeros(SHAPE), 0.5)


def test_output_channels_is_validated():
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(solverlab.OptionError, match="output_channels"):
            solverlab.TorchModel(Net("ok"), "vp-linear", output_channels=bad)
