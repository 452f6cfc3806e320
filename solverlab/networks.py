"""Small noise-prediction networks for the shipped data sets, rebuilt from a JSON config.

- :class:`MLP`: 2-D points; residual SiLU blocks conditioned on a sinusoidal time embedding;
- :class:`UNet`: 1x8x8 images (digits); two resolutions (8x8 and 4x4), residual blocks with
  GroupNorm, SiLU and an added time embedding (Ho et al. 2020, appendix B, scaled down).

Both take ``module(x, s)`` with ``s`` the network time of shape ``(batch,)``: the step index
``0..N-1`` of a discrete schedule (``time_input="index"``, the trainer's default) or, with
``time_scale=1000``, a continuous ``t`` in ``(0, 1]``. The embedding is the transformer's
sinusoidal one of ``time_scale * s`` (Vaswani et al. 2017, sec. 3.5; DDPM's timestep embedding).

``build_network(config)`` builds either from ``{"kind": "mlp" | "unet", ...options}``; a
module's ``config`` is the full dictionary (defaults filled in) that rebuilds it, which is what
a checkpoint stores.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from .errors import OptionError

__all__ = ["MLP", "NETWORKS", "UNet", "build_network", "timestep_embedding"]


def timestep_embedding(s: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """``[cos(s w_k), sin(s w_k)]``, ``w_k = max_period^(-k/(dim/2))``, ``k < dim/2``; shape
    ``(batch, dim)`` (``dim`` even)."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                       device=s.device) / half).to(s.dtype)
    a = s.reshape(-1, 1) * w
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


def _int(kind: str, name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OptionError(f"network {kind!r}: option {name}={value!r} is not allowed; give an "
                          f"int >= {low}")
    return value


def _even(kind: str, name: str, value: Any) -> int:
    _int(kind, name, value, 2)
    if value % 2:
        raise OptionError(f"network {kind!r}: option {name}={value!r} is not allowed; give an "
                          "even int >= 2")
    return value


def _scale(kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise OptionError(f"network {kind!r}: option time_scale={value!r} is not allowed; give "
                          "a finite number > 0 (1 for step indices, 1000 for t in (0, 1])")
    return float(value)


class _TimeMLP(nn.Module):
    def __init__(self, embedding: int, width: int, time_scale: float) -> None:
        super().__init__()
        self.embedding, self.time_scale = embedding, time_scale
        self.net = nn.Sequential(nn.Linear(embedding, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, s: Tensor) -> Tensor:
        return self.net(timestep_embedding(s * self.time_scale, self.embedding))


class _ResidualLinear(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lin1 = nn.Linear(width, width)
        self.lin2 = nn.Linear(width, width)
        self.temb = nn.Linear(width, width)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        r = self.lin1(nn.functional.silu(self.norm(h))) + self.temb(temb)
        return h + self.lin2(nn.functional.silu(r))


class MLP(nn.Module):
    """A residual MLP for ``dim``-dimensional points: input projection, ``depth`` residual
    blocks (LayerNorm, SiLU, two linear layers, the time embedding added between them), output
    projection. ``hidden`` is the width, ``time_embedding`` the size of the sinusoidal
    embedding. About ``3 depth hidden^2`` parameters (175k by default, 0.7 MB in float32)."""

    def __init__(self, *, dim: int = 2, hidden: int = 128, depth: int = 3,
                 time_embedding: int = 64, time_scale: float = 1.0) -> None:
        super().__init__()
        self.config = {"kind": "mlp", "dim": _int("mlp", "dim", dim),
                       "hidden": _int("mlp", "hidden", hidden),
                       "depth": _int("mlp", "depth", depth, 0),
                       "time_embedding": _even("mlp", "time_embedding", time_embedding),
                       "time_scale": _scale("mlp", time_scale)}
        self.time = _TimeMLP(time_embedding, hidden, float(time_scale))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualLinear(hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        temb = nn.functional.silu(self.time(s.to(x.dtype)))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(math.gcd(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small two-resolution UNet for ``channels x size x size`` images (``size`` even; 8
    for digits): ``base`` channels at full resolution, ``2 base`` at half. A residual block at
    8x8, a strided convolution down, two residual blocks at 4x4, nearest upsampling and a
    convolution up, and a residual block on the upsampled features concatenated with the 8x8
    ones (the skip connection); GroupNorm (``groups``) and SiLU, the time embedding added in
    every block. About 230k parameters for ``base=32`` (0.9 MB in float32)."""

    def __init__(self, *, channels: int = 1, base: int = 32, groups: int = 8,
                 time_embedding: int = 64, time_scale: float = 1.0) -> None:
        super().__init__()
        self.config = {"kind": "unet", "channels": _int("unet", "channels", channels),
                       "base": _int("unet", "base", base),
                       "groups": _int("unet", "groups", groups),
                       "time_embedding": _even("unet", "time_embedding", time_embedding),
                       "time_scale": _scale("unet", time_scale)}
        c1, c2, tdim = base, 2 * base, 2 * base
        self.time = _TimeMLP(time_embedding, tdim, float(time_scale))
        self.inp = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1 = _ResBlock(c1, c1, tdim, groups)
        self.downsample = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = _ResBlock(c1, c2, tdim, groups)
        self.mid = _ResBlock(c2, c2, tdim, groups)
        self.upsample = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = _ResBlock(2 * c1, c1, tdim, groups)
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(groups, c1), c1), nn.SiLU(),
                                 nn.Conv2d(c1, channels, 3, padding=1))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        temb = nn.functional.silu(self.time(s.to(x.dtype)))
        h1 = self.down1(self.inp(x), temb)
        h2 = self.down2(self.downsample(h1), temb)
        h = self.upsample(nn.functional.interpolate(self.mid(h2, temb), scale_factor=2.0,
                                                    mode="nearest"))
        return self.out(self.up1(torch.cat([h, h1], 1), temb))


#: The network kinds by name.
NETWORKS: Mapping[str, type[nn.Module]] = MappingProxyType({"mlp": MLP, "unet": UNet})


def network_options(kind: str) -> dict[str, Any]:
    """The options of network ``kind`` with their defaults."""
    return {p.name: p.default for p in inspect.signature(NETWORKS[kind]).parameters.values()}


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """The network ``config["kind"]`` built with the other keys as options (float32, torch's
    current random state for the initial weights). Unknown kinds or options are errors listing
    what there is."""
    if not isinstance(config, Mapping):
        raise OptionError(f"network config {config!r} is not a mapping; give e.g. "
                          "{'kind': 'mlp', 'hidden': 128}")
    options = dict(config)
    kind = options.pop("kind", None)
    if kind not in NETWORKS:
        close = difflib.get_close_matches(str(kind), list(NETWORKS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(f"network kind={kind!r} is not allowed{hint}; choose one of "
                          f"{', '.join(map(repr, NETWORKS))}")
    allowed = network_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise OptionError(f"network {kind!r} has no option {', '.join(map(repr, unknown))}; its "
                          f"options are: {', '.join(allowed)}")
    return NETWORKS[kind](**options)
