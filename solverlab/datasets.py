"""Training data sets that ship with the package: four generated 2-D sets and scikit-learn's
8x8 digits.

- ``moons``, ``swissroll``, ``checkerboard``, ``gmm``: shape ``(2,)``, generated on demand
  from a :class:`torch.Generator` (an endless supply of independent draws; the same
  generator state gives the same points), centred and scaled to about unit variance per
  coordinate (one scale for both axes, so the shape is kept);
- ``digits``: scikit-learn's 1797 handwritten digits (``sklearn.datasets.load_digits``, bundled
  with scikit-learn, no download), shape ``(1, 8, 8)``, grey levels ``0..16`` mapped linearly
  onto ``[-1, 1]``; needs the ``digits`` extra (``pip install 'solverlab[digits]'``).

:func:`get_dataset` builds a set with its options, :func:`load_dataset` draws a tensor from it.
"""

from __future__ import annotations

import difflib
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from .errors import MissingExtraError, OptionError, UnknownNameError

__all__ = ["DATASETS", "Checkerboard", "Dataset", "Digits", "GaussianRing", "Moons", "SwissRoll",
           "digits_table", "get_dataset", "load_dataset"]

F64 = torch.float64
#: Points drawn by :func:`load_dataset` for a generated set when ``n`` is not given.
DEFAULT_POINTS = 10_000


def _nonneg(cls: str, name: str) -> Any:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0):
            raise OptionError(f"dataset {cls!r}: option {name}={value!r} is not allowed; give a "
                              "finite number >= 0")
    return check


def _positive(cls: str, name: str) -> Any:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise OptionError(f"dataset {cls!r}: option {name}={value!r} is not allowed; give a "
                              "finite number > 0")
    return check


def _count_option(cls: str, name: str) -> Any:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"dataset {cls!r}: option {name}={value!r} is not allowed; give an "
                              "int >= 1")
    return check


def _count(what: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OptionError(f"{what}: n={n!r} is not allowed; give the number of points, an int "
                          ">= 1")
    return n


@attrs.frozen(kw_only=True)
class Dataset(ABC):
    """A training distribution: :meth:`sample` draws ``n`` points of shape ``(n, *shape)``.

    Options are attrs fields with validators; :meth:`spec` (name and options, JSON) rebuilds
    the set with :func:`get_dataset` (a checkpoint stores it)."""

    name: ClassVar[str]
    shape: ClassVar[tuple[int, ...]]

    @abstractmethod
    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` points in float64."""

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` independent draws, shape ``(n, *shape)``, in ``dtype``; the randomness comes
        from ``generator`` alone (torch's global generator when ``None``)."""
        n = _count(f"dataset {self.name!r}", n)
        return self._draw(n, generator).to(dtype)

    def options(self) -> dict[str, Any]:
        return {a.name: getattr(self, a.name) for a in attrs.fields(type(self)) if a.init}

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}``: what :func:`get_dataset` rebuilds it from."""
        return {"name": self.name, "options": self.options()}


def _jitter(points: Tensor, noise: float, generator: torch.Generator | None) -> Tensor:
    z = torch.randn(points.shape, generator=generator, dtype=F64)
    return points + noise * z


@attrs.frozen(kw_only=True)
class Moons(Dataset):
    """Two interleaved half circles (the "two moons"): a fair coin picks the upper arc
    ``(cos u, sin u)`` or the lower ``(1 - cos u, 1/2 - sin u)``, ``u ~ U(0, pi)``; then
    centred, scaled by 1/0.705 (unit mean variance) and jittered by ``noise`` (standard
    deviation, in the scaled units)."""

    name: ClassVar[str] = "moons"
    shape: ClassVar[tuple[int, ...]] = (2,)
    noise: float = attrs.field(default=0.05, validator=_nonneg("moons", "noise"))

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        upper = torch.rand(n, generator=generator, dtype=F64) < 0.5
        u = math.pi * torch.rand(n, generator=generator, dtype=F64)
        x = torch.where(upper, torch.cos(u), 1 - torch.cos(u)) - 0.5
        y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u)) - 0.25
        return _jitter(torch.stack([x, y], 1) / 0.705, self.noise, generator)


@attrs.frozen(kw_only=True)
class SwissRoll(Dataset):
    """The 2-D swiss roll: ``s (cos s, sin s)`` with ``s = 3 pi/2 (1 + 2u)``, ``u ~ U(0, 1)``,
    centred, scaled by 1/6.79 (unit mean variance) and jittered by ``noise``."""

    name: ClassVar[str] = "swissroll"
    shape: ClassVar[tuple[int, ...]] = (2,)
    noise: float = attrs.field(default=0.05, validator=_nonneg("swissroll", "noise"))

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        s = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=F64))
        p = torch.stack([s * torch.cos(s) - 2.0, s * torch.sin(s) - 0.22], 1) / 6.79
        return _jitter(p, self.noise, generator)


@attrs.frozen(kw_only=True)
class Checkerboard(Dataset):
    """Uniform on the 8 dark squares of a 4x4 board on ``[-2, 2]^2`` (FFJORD's toy set,
    Grathwohl et al. 2019), scaled by ``sqrt(3)/2`` to unit variance per coordinate."""

    name: ClassVar[str] = "checkerboard"
    shape: ClassVar[tuple[int, ...]] = (2,)

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        x = 4 * torch.rand(n, generator=generator, dtype=F64) - 2
        row = torch.randint(0, 2, (n,), generator=generator).to(F64)
        y = torch.rand(n, generator=generator, dtype=F64) - 2 * row + torch.floor(x) % 2
        return torch.stack([x, y], 1) * (math.sqrt(3) / 2)


@attrs.frozen(kw_only=True)
class GaussianRing(Dataset):
    """``components`` equal-weight isotropic Gaussians (standard deviation ``std``) centred on a
    circle of ``radius``; per-coordinate variance ``radius^2/2 + std^2`` (0.99 by default)."""

    name: ClassVar[str] = "gmm"
    shape: ClassVar[tuple[int, ...]] = (2,)
    components: int = attrs.field(default=8, validator=_count_option("gmm", "components"))
    radius: float = attrs.field(default=1.4, validator=_positive("gmm", "radius"))
    std: float = attrs.field(default=0.1, validator=_positive("gmm", "std"))

    def means(self) -> Tensor:
        """The component means, ``(components, 2)`` float64."""
        a = 2 * math.pi * torch.arange(self.components, dtype=F64) / self.components
        return self.radius * torch.stack([torch.cos(a), torch.sin(a)], 1)

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        k = torch.randint(0, self.components, (n,), generator=generator)
        return _jitter(self.means()[k], self.std, generator)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingExtraError(
            f"scikit-learn's digits (the 'digits' data set, the digits classifier's training "
            f"and test images) need scikit-learn, which is not installed ({e}); install the "
            "extra: pip install 'solverlab[digits]'") from None
    d = load_digits()
    images = torch.as_tensor(d.images, dtype=F64)  # (1797, 8, 8), 0..16
    return ((images / 8.0 - 1.0).unsqueeze(1).contiguous(),
            torch.as_tensor(d.target, dtype=torch.int64))


def digits_table() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 digits in their order: images float64 ``(1797, 1, 8, 8)`` mapped
    from ``0..16`` to ``[-1, 1]`` as ``g/8 - 1``, and labels int64 ``(1797,)``. Needs the
    ``digits`` extra (:class:`~solverlab.MissingExtraError` otherwise)."""
    return _sklearn_digits()


def _digits_table() -> Tensor:
    return _sklearn_digits()[0]


@attrs.frozen(kw_only=True)
class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (1797 images, UCI optdigits test set), grey levels
    ``0..16`` mapped to ``[-1, 1]`` as ``g/8 - 1``; shape ``(1, 8, 8)``. :meth:`sample` draws
    images uniformly with replacement; :meth:`table` is the whole set in its order."""

    name: ClassVar[str] = "digits"
    shape: ClassVar[tuple[int, ...]] = (1, 8, 8)

    def table(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """All 1797 images, ``(1797, 1, 8, 8)``."""
        return _digits_table().to(dtype)

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        table = _digits_table()
        return table[torch.randint(0, table.shape[0], (n,), generator=generator)]


#: The data sets by name.
DATASETS: Mapping[str, type[Dataset]] = MappingProxyType(
    {c.name: c for c in (Moons, SwissRoll, Checkerboard, GaussianRing, Digits)})


def get_dataset(name: str, **options: Any) -> Dataset:
    """The data set ``name`` with ``options`` (e.g. ``get_dataset("moons", noise=0.1)``); an
    unknown name or option is an error listing what there is."""
    if not isinstance(name, str) or name not in DATASETS:
        close = difflib.get_close_matches(str(name), list(DATASETS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownNameError(f"unknown dataset {name!r}{hint}. Datasets: "
                               f"{', '.join(DATASETS)}")
    cls = DATASETS[name]
    allowed = [a.name for a in attrs.fields(cls) if a.init]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise OptionError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; its "
                          f"options are: {', '.join(allowed) or '(none)'}")
    return cls(**options)


def load_dataset(name: str, n: int | None = None, seed: int = 0, *,
                 dtype: torch.dtype = torch.float32, **options: Any) -> Tensor:
    """``n`` points of the data set ``name`` drawn with a generator seeded by ``seed``
    (deterministic). ``n=None``: the whole ``digits`` set in its order, or
    :data:`DEFAULT_POINTS` points of a generated set."""
    ds = get_dataset(name, **options)
    if n is None and isinstance(ds, Digits):
        return ds.table(dtype)
    n = DEFAULT_POINTS if n is None else _count(f"load_dataset({name!r})", n)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"load_dataset: seed={seed!r} is not allowed; give an int")
    return ds.sample(n, torch.Generator().manual_seed(seed), dtype)
