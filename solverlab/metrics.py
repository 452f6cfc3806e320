"""Sample-quality metrics and the Lipschitz probe in time.

- :func:`frechet_distance`: the Fréchet distance between Gaussian fits of two feature sets,
  ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` (Dowson & Landau 1982; used as
  FID by Heusel et al. 2017), and its closed form :func:`gaussian_frechet`.
- :func:`digits_frechet`: that distance for 8x8 digits, in the feature space of a small CNN
  trained on scikit-learn's digits and shipped with solverlab
  (``solverlab/data/digits_classifier.safetensors``; :func:`digits_classifier_info`).
- :func:`sliced_wasserstein`: the sliced Wasserstein distance ``SW_p`` (Bonneel et al. 2015)
  between point sets, e.g. 2-D toy data, by Monte Carlo over random directions.
- :func:`lipschitz_profile`: the finite-difference Lipschitz constant in time of a model's
  noise prediction, ``K(t) = E_x ||eps(x, t+dt) - eps(x, t)|| / dt`` with the same noised
  input ``x`` for both evaluations, near ``t -> 0`` where plain models blow up and
  timestep-shared ones (Yang et al. 2024, E-TSDM) are flat with jumps at the sub-interval
  boundaries; :func:`lipschitz_report` writes it as JSON, CSV and a plot, and
  :func:`run_lipschitz` is what ``solverlab lipschitz`` runs.

Train the shipped classifier again with ``python -m solverlab.metrics train-classifier``
(needs ``pip install 'solverlab[digits]'``); loading it never needs scikit-learn.
docs/metrics.md explains the definitions and how to read the plots.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _io
from .datasets import digits_table
from .errors import InputError, ModelOutputError, OptionError, SolverlabError
from .model import Denoiser, Model
from .objective import discrete_steps
from .schedule import Schedule

__all__ = [
    "ARCHITECTURE",
    "CLASSIFIER_FILE",
    "DIGITS_EXTRA",
    "LIPSCHITZ_DEFINITION",
    "LIPSCHITZ_OUTPUTS",
    "TRAIN_SIZE",
    "DigitsClassifier",
    "digits_classifier",
    "digits_classifier_info",
    "digits_dataset",
    "digits_features",
    "digits_frechet",
    "frechet_distance",
    "gaussian_frechet",
    "lipschitz_comparison",
    "lipschitz_grid",
    "lipschitz_profile",
    "lipschitz_report",
    "lipschitz_values",
    "main",
    "run_lipschitz",
    "sliced_wasserstein",
    "train_digits_classifier",
]

F64 = torch.float64


# -- input checks ----------------------------------------------------------------------------
def _tensor(owner: str, name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        try:  # float64: a list of times must not be rounded to float32
            value = torch.as_tensor(value, dtype=F64)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{owner}: {name} is a {type(value).__name__}, not a tensor or an "
                             "array of numbers") from None
    if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise InputError(f"{owner}: {name} has dtype {value.dtype}; give real numbers")
    return value


def _finite(owner: str, name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise InputError(f"{owner}: {name} holds {bad} NaN or infinite value(s); every value "
                         "must be finite")


def _point_set(owner: str, name: str, value: Any, min_rows: int) -> Tensor:
    """``value`` as a finite float64 ``(n, d)`` tensor with ``n >= min_rows``."""
    x = _tensor(owner, name, value)
    if x.ndim != 2:
        raise InputError(f"{owner}: {name} has shape {tuple(x.shape)}; give a 2-D tensor "
                         "(n points, d features), e.g. x.flatten(1)")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise InputError(f"{owner}: {name} has shape {tuple(x.shape)}; it needs at least "
                         f"{min_rows} row(s) and one column")
    x = x.detach().to("cpu", F64)
    _finite(owner, name, x)
    return x


def _same_width(owner: str, a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError(f"{owner}: a has {a.shape[1]} features per point and b has "
                         f"{b.shape[1]}; both sets must have the same dimension")


def _int_option(owner: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OptionError(f"{owner}: option {name}={value!r} is not allowed; give an int >= "
                          f"{low}")
    return value


def _float_option(owner: str, name: str, value: Any, *, gt: float | None = None,
                  ge: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)
    if not ok:
        bound = f" > {gt:g}" if gt is not None else f" >= {ge:g}" if ge is not None else ""
        raise OptionError(f"{owner}: option {name}={value!r} is not allowed; give a finite "
                          f"number{bound}")
    return float(value)


# -- Frechet distance ------------------------------------------------------------------------
def _psd_sqrt(owner: str, name: str, s: Tensor) -> Tensor:
    """The symmetric square root of the positive semi-definite ``s`` (eigenvalues below zero
    by round-off clamped to 0; clearly negative ones are an error)."""
    s = 0.5 * (s + s.T)
    e, v = torch.linalg.eigh(s)
    scale = max(float(e.abs().max()), 1e-300)
    if float(e.min()) < -1e-8 * scale:
        raise InputError(f"{owner}: {name} is not positive semi-definite (smallest eigenvalue "
                         f"{float(e.min()):.3g}, largest {float(e.max()):.3g}); give a "
                         "covariance matrix")
    return (v * e.clamp(min=0).sqrt()) @ v.T


def gaussian_frechet(mu1: Any, s1: Any, mu2: Any, s2: Any) -> float:
    """The Fréchet (2-Wasserstein squared) distance between ``N(mu1, s1)`` and ``N(mu2, s2)``:
    ``||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1^1/2 s2 s1^1/2)^1/2)`` (Dowson & Landau
    1982; the FID formula of Heusel et al. 2017 with ``tr((s1 s2)^1/2)`` written in its
    symmetric form).

    Computed in float64 with two symmetric eigendecompositions (``s1^1/2``, then the
    eigenvalues of ``s1^1/2 s2 s1^1/2``, clamped at 0), so no complex round-off appears; the
    result is clamped at 0. ``mu``: ``(d,)``; ``s``: symmetric positive semi-definite
    ``(d, d)``.
    """
    owner = "gaussian_frechet"
    m1, m2 = (_tensor(owner, n, v).detach().to("cpu", F64) for n, v in (("mu1", mu1),
                                                                         ("mu2", mu2)))
    c1, c2 = (_tensor(owner, n, v).detach().to("cpu", F64) for n, v in (("s1", s1), ("s2", s2)))
    if m1.ndim != 1 or m2.shape != m1.shape:
        raise InputError(f"{owner}: mu1 has shape {tuple(m1.shape)} and mu2 "
                         f"{tuple(m2.shape)}; give two vectors of the same length d")
    d = m1.shape[0]
    for name, c in (("s1", c1), ("s2", c2)):
        if c.shape != (d, d):
            raise InputError(f"{owner}: {name} has shape {tuple(c.shape)}; give a ({d}, {d}) "
                             "covariance matrix (d = the length of mu)")
    for name, v in (("mu1", m1), ("mu2", m2), ("s1", c1), ("s2", c2)):
        _finite(owner, name, v)
    for name, c in (("s1", c1), ("s2", c2)):
        asym = float((c - c.T).abs().max())
        if asym > 1e-8 * max(float(c.abs().max()), 1e-300):
            raise InputError(f"{owner}: {name} is not symmetric (max |S - S^T| = {asym:.3g}); "
                             "give a covariance matrix")
    return _frechet(m1, c1, m2, c2)


def _frechet(m1: Tensor, c1: Tensor, m2: Tensor, c2: Tensor) -> float:
    r = _psd_sqrt("gaussian_frechet", "s1", c1)
    _psd_sqrt("gaussian_frechet", "s2", c2)  # the same check for s2
    m = r @ (0.5 * (c2 + c2.T)) @ r
    cross = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()
    value = (m1 - m2).square().sum() + torch.trace(c1) + torch.trace(c2) - 2.0 * cross
    return max(float(value), 0.0)


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_distance(a: Any, b: Any) -> float:
    """The Fréchet distance between Gaussian fits of the feature sets ``a`` ``(n, d)`` and ``b``
    ``(m, d)``: :func:`gaussian_frechet` of their means and unbiased (``n - 1``) covariances,
    in float64.

    The estimate is biased upwards by sampling (of order ``d / n``): compare numbers computed
    with the same set sizes. ``n, m >= 2``; every value finite.
    """
    owner = "frechet_distance"
    a = _point_set(owner, "a", a, 2)
    b = _point_set(owner, "b", b, 2)
    _same_width(owner, a, b)
    (m1, c1), (m2, c2) = _mean_cov(a), _mean_cov(b)
    return _frechet(m1, c1, m2, c2)


# -- sliced Wasserstein ----------------------------------------------------------------------
def _wasserstein_1d(u: Tensor, v: Tensor, p: float) -> Tensor:
    """``W_p^p`` between the empirical measures of the rows of ``u`` ``(k, n)`` and ``v``
    ``(k, m)`` (one value per row): the integral over ``q in (0, 1)`` of ``|F^-1(q) -
    G^-1(q)|^p`` with the empirical (step) quantile functions, exact for any ``n, m``."""
    u, _ = torch.sort(u, dim=1)
    v, _ = torch.sort(v, dim=1)
    n, m = u.shape[1], v.shape[1]
    if n == m:
        return (u - v).abs().pow(p).mean(1)
    # Both quantile functions are constant between consecutive points of {i/n} U {j/m}.
    ends = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=F64) / n,
                                   torch.arange(1, m + 1, dtype=F64) / m]))
    ends[-1] = 1.0
    starts = torch.cat([torch.zeros(1, dtype=F64), ends[:-1]])
    widths = ends - starts
    mid = 0.5 * (starts + ends)
    iu = torch.clamp((mid * n).floor().long(), max=n - 1)
    iv = torch.clamp((mid * m).floor().long(), max=m - 1)
    return ((u[:, iu] - v[:, iv]).abs().pow(p) * widths).sum(1)


def sliced_wasserstein(a: Any, b: Any, *, projections: int = 256, p: float = 2,
                       generator: torch.Generator | None = None) -> float:
    """The sliced Wasserstein distance ``SW_p`` between the point sets ``a`` ``(n, d)`` and
    ``b`` ``(m, d)`` (Bonneel et al. 2015), each point of a set weighted equally::

        SW_p(a, b) = ( E_theta[ W_p^p(theta.a, theta.b) ] )^(1/p),  theta ~ uniform on S^(d-1)

    estimated by the mean over ``projections`` random unit directions (Gaussian vectors
    normalised; from ``generator``, default a generator seeded with 0, so equal inputs give
    equal numbers). The 1-D ``W_p^p`` is exact: sorting for ``n = m``, the integral of the
    empirical quantile functions' difference otherwise. In 1-D (``d = 1``) ``SW_p = W_p``.

    Known values: a shift ``b = a + m`` gives ``W_p(theta) = |theta.m|``, so
    ``SW_2 = ||m|| / sqrt(d)`` (``E[(theta.m)^2] = ||m||^2 / d``): ``||m|| / sqrt(2)`` in 2-D;
    two Gaussians ``N(m1, s^2 I)``, ``N(m2, s^2 I)`` have the same ``SW_2`` with
    ``m = m1 - m2``. The Monte-Carlo error of ``SW_2^2`` is ``O(1 / sqrt(projections))``.
    Computed in float64.
    """
    owner = "sliced_wasserstein"
    a = _point_set(owner, "a", a, 1)
    b = _point_set(owner, "b", b, 1)
    _same_width(owner, a, b)
    projections = _int_option(owner, "projections", projections, 1)
    p = _float_option(owner, "p", p, ge=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise OptionError(f"{owner}: option generator={generator!r} is not allowed; give a "
                          "torch.Generator or None")
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    theta = torch.randn(a.shape[1], projections, generator=gen, dtype=F64,
                        device=gen.device).to("cpu")
    theta = theta / theta.norm(dim=0, keepdim=True).clamp(min=1e-300)
    # projections in chunks of about 2^22 projected values per set (memory stays bounded)
    chunk = max(1, (1 << 22) // (a.shape[0] + b.shape[0]))
    wp = torch.cat([_wasserstein_1d(th.T @ a.T, th.T @ b.T, p)
                    for th in theta.split(chunk, dim=1)])
    return float(wp.mean()) ** (1.0 / p)


# -- the digits classifier -------------------------------------------------------------------
#: The shipped classifier's file inside the package.
CLASSIFIER_FILE = "data/digits_classifier.safetensors"
#: The extra that installs scikit-learn.
DIGITS_EXTRA = "pip install 'solverlab[digits]'"
#: Images ``[0, TRAIN_SIZE)`` of scikit-learn's digits train the classifier; the rest (the last
#: 360 of 1797, 20%) test it.
TRAIN_SIZE = 1437
_FORMAT = "solverlab-digits-classifier"


class DigitsClassifier(nn.Module):
    """The small CNN of :func:`digits_features`: 8x8 digits in ``[-1, 1]`` to 10 logits.

    ``conv 3x3 (1 -> 16), ReLU, conv 3x3 (16 -> 32), ReLU, max-pool 2, linear (512 -> 32),
    ReLU`` (the 32 features), ``linear (32 -> 10)``.
    """

    FEATURES = 32

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, self.FEATURES)
        self.fc2 = nn.Linear(self.FEATURES, 10)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate-layer activations ``(n, 32)`` of images ``x`` ``(n, 1, 8, 8)``."""
        h = torch.relu(self.conv1(x))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return torch.relu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


#: The architecture of :class:`DigitsClassifier`, as written into the classifier's metadata.
ARCHITECTURE = ("conv3x3(1->16, pad 1) relu conv3x3(16->32, pad 1) relu maxpool2 "
                "linear(512->32) relu [features] linear(32->10)")


def digits_dataset(split: str = "all") -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as ``(images, labels)``: images float32 ``(n, 1, 8, 8)``
    scaled from ``0..16`` to ``[-1, 1]`` (``x / 8 - 1``), labels int64 ``(n,)``.

    ``split``: ``"all"`` (1797 images), ``"train"`` (the first 1437, which trained the
    shipped classifier) or ``"test"`` (the last 360, which measured its accuracy). Needs
    scikit-learn (``pip install 'solverlab[digits]'``).
    """
    if split not in ("all", "train", "test"):
        raise OptionError(f"digits_dataset: option split={split!r} is not allowed; choose "
                          "'all', 'train' or 'test'")
    table, labels = digits_table()
    images = table.to(torch.float32)
    part = {"all": slice(None), "train": slice(0, TRAIN_SIZE), "test": slice(TRAIN_SIZE, None)}
    return images[part[split]], labels[part[split]]


def _read_header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its header: 8-byte little-endian length,
    then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8:8 + length].decode("utf-8")).get("__metadata__") or {})


def _classifier_bytes() -> bytes:
    return resources.files("solverlab").joinpath(CLASSIFIER_FILE).read_bytes()


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[DigitsClassifier, dict[str, str]]:
    from safetensors.torch import load

    data = _classifier_bytes()
    meta = _read_header(data)
    if meta.get("format") != _FORMAT:
        raise SolverlabError(f"{CLASSIFIER_FILE} is not a solverlab digits classifier "
                             f"(format {meta.get('format')!r}); reinstall solverlab")
    net = DigitsClassifier()
    net.load_state_dict(load(data))
    net.eval().requires_grad_(False)
    return net, meta


def digits_classifier() -> DigitsClassifier:
    """The shipped classifier (float32, eval mode, no gradients; loaded once, without
    scikit-learn)."""
    return _shipped()[0]


def digits_classifier_info() -> dict[str, Any]:
    """The shipped classifier's metadata: ``architecture``, ``test_accuracy`` (float, on the
    last 360 digits), ``train_accuracy``, ``seed``, ``steps``, ``split``, ``command`` (how it
    was trained), ``torch`` (the version that trained it)."""
    meta = dict(_shipped()[1])
    out: dict[str, Any] = dict(meta)
    for key in ("test_accuracy", "train_accuracy"):
        out[key] = float(meta[key])
    for key in ("seed", "steps", "features"):
        out[key] = int(meta[key])
    return out


def _digit_images(owner: str, name: str, x: Any) -> Tensor:
    x = _tensor(owner, name, x)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8) or x.shape[0] < 1:
        raise InputError(f"{owner}: {name} has shape {tuple(x.shape)}; give digits as "
                         "(n, 1, 8, 8) images in [-1, 1] (scikit-learn's 0..16 pixels as "
                         "x / 8 - 1)")
    x = x.detach().to("cpu", torch.float32)
    _finite(owner, name, x)
    return x


def digits_features(x: Any, *, batch_size: int = 4096) -> Tensor:
    """The shipped classifier's penultimate-layer features ``(n, 32)`` (float64) of digits
    ``x`` ``(n, 1, 8, 8)`` in ``[-1, 1]`` (values are used as given: clamp samples first if
    they should be valid pixels)."""
    x = _digit_images("digits_features", "x", x)
    batch_size = _int_option("digits_features", "batch_size", batch_size, 1)
    net = digits_classifier()
    with torch.no_grad():
        return torch.cat([net.features(c) for c in x.split(batch_size)]).to(F64)


@functools.lru_cache(maxsize=1)
def _reference_features() -> Tensor:
    return digits_features(digits_dataset("all")[0])


def digits_frechet(samples: Any, reference: Any = None) -> float:
    """The Fréchet distance between digits ``samples`` ``(n, 1, 8, 8)`` and ``reference`` in
    the shipped classifier's feature space (:func:`digits_features`, :func:`frechet_distance`).

    ``reference``: images like ``samples``; default all 1797 of scikit-learn's digits (needs
    ``pip install 'solverlab[digits]'``). The number depends on the sample size (the Gaussian
    fit's bias): compare models at equal ``n``.
    """
    a = digits_features(samples)
    if a.shape[0] < 2:
        raise InputError(f"digits_frechet: samples has {a.shape[0]} image; give at least 2")
    b = _reference_features() if reference is None else digits_features(reference)
    return frechet_distance(a, b)


def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).to(F64).mean())


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image moved by -1, 0 or +1 pixel in each direction (drawn from ``gen``), the
    uncovered border filled with the background value -1."""
    n = x.shape[0]
    pad = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    views = torch.stack([pad[:, :, i:i + 8, j:j + 8] for i in range(3) for j in range(3)])
    pick = torch.randint(0, 9, (n,), generator=gen)
    return views[pick, torch.arange(n)]


def train_digits_classifier(out: str | Path, *, seed: int = 0, steps: int = 2000,
                            batch_size: int = 128, lr: float = 2e-3,
                            command: str | None = None) -> dict[str, Any]:
    """Train :class:`DigitsClassifier` on the first 1437 of scikit-learn's digits and write it
    (safetensors, atomically) to ``out`` with its metadata; returns the metadata.

    Adam (``lr``, cosine decay to 0 over ``steps``), cross-entropy, batches of ``batch_size``
    drawn with replacement, each image shifted by up to one pixel in each direction
    (augmentation); initialisation, batches and shifts from ``seed``. ``test_accuracy`` is
    measured on the last 360 images, which training never sees (they come from other writers
    than most training images: a harder split than a random one). Needs scikit-learn.
    """
    from safetensors.torch import save

    owner = "train_digits_classifier"
    seed = _int_option(owner, "seed", seed, 0)
    steps = _int_option(owner, "steps", steps, 1)
    batch_size = _int_option(owner, "batch_size", batch_size, 1)
    lr = _float_option(owner, "lr", lr, gt=0)
    x_train, y_train = digits_dataset("train")
    x_test, y_test = digits_dataset("test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x_train.shape[0], (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(net(_shift(x_train[idx], gen)), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    import sklearn

    meta = {
        "format": _FORMAT,
        "architecture": ARCHITECTURE,
        "features": str(DigitsClassifier.FEATURES),
        "test_accuracy": repr(_accuracy(net, x_test, y_test)),
        "train_accuracy": repr(_accuracy(net, x_train, y_train)),
        "seed": str(seed),
        "steps": str(steps),
        "optimizer": (f"Adam lr={lr:g} cosine to 0, batch {batch_size} drawn with "
                      "replacement, random shifts of up to 1 pixel"),
        "split": (f"sklearn.datasets.load_digits, pixels x/8 - 1; train: images "
                  f"0..{TRAIN_SIZE - 1}, test: images {TRAIN_SIZE}..1796"),
        "command": command or (f"python -m solverlab.metrics train-classifier --seed {seed} "
                               f"--steps {steps} --out {out}"),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "sklearn": sklearn.__version__,
    }
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    _io.write_bytes(out, save(state, metadata=meta))
    return meta


# -- the Lipschitz probe ---------------------------------------------------------------------
#: What ``K`` means, as written into every result.
LIPSCHITZ_DEFINITION = (
    "K(t) = mean over x0 of ||eps(x, t + dt) - eps(x, t)||_2 / dt with x = alpha_t x0 + "
    "sigma_t z (z fixed per x0), the same x for both evaluations: only the time changes")
#: The files a Lipschitz report folder holds.
LIPSCHITZ_OUTPUTS = ("lipschitz.json", "lipschitz.csv", "lipschitz.png")
#: The share of :func:`lipschitz_grid`'s points inside the near-zero region.
_DENSE = 0.75


def _default_dt(schedule: Schedule) -> float:
    n = discrete_steps(schedule)
    return 1.0 / n if n is not None else 1e-3 * (schedule.t_max - schedule.t_min)


def lipschitz_grid(schedule: Schedule, n: int = 128, *, near_zero: float = 0.15,
                   dt: float | None = None) -> Tensor:
    """Increasing float64 times for :func:`lipschitz_profile`, dense near ``t -> 0``.

    Three quarters of the ``n`` points lie in the first ``near_zero`` of the time range,
    geometrically spaced in the distance from ``t_min`` (so the first steps are all there); the
    rest are uniform over the remainder, up to ``t_max - dt``. For a discrete schedule
    (``vp-discrete``, ``N`` steps) the points are the discrete nodes ``t = (k+1)/N`` (``dt``
    defaults to ``1/N``, so ``t + dt`` is the next node) and duplicates are dropped: fewer than
    ``n`` may come back. Continuous schedules: ``dt`` defaults to ``1e-3`` of the range.
    """
    owner = "lipschitz_grid"
    if not isinstance(schedule, Schedule):
        raise OptionError(f"{owner}: schedule={schedule!r} is not a solverlab Schedule")
    n = _int_option(owner, "n", n, 2)
    near_zero = _float_option(owner, "near_zero", near_zero, gt=0)
    if near_zero > 1:
        raise OptionError(f"{owner}: option near_zero={near_zero!r} is not allowed; give the "
                          "share of the time range in (0, 1] that gets most points")
    dt = _default_dt(schedule) if dt is None else _float_option(owner, "dt", dt, gt=0)
    lo, hi = schedule.t_min, schedule.t_max - dt
    if hi < lo:
        raise OptionError(f"{owner}: option dt={dt!r} is longer than the time range "
                          f"[{schedule.t_min!r}, {schedule.t_max!r}]")
    steps = discrete_steps(schedule)
    unit = dt if steps is None else 1.0 / steps
    span = max(hi - lo, unit)
    edge = lo + near_zero * span
    n_near = max(2, math.ceil(_DENSE * n)) if n > 2 else n
    near = lo - unit + torch.logspace(math.log10(unit), math.log10(edge - lo + unit), n_near,
                                      dtype=F64)
    rest = torch.linspace(edge, hi, n - n_near + 1, dtype=F64)[1:]
    t = torch.cat([near, rest]).clamp(lo, hi)
    if steps is not None:
        t = (torch.round(t * steps) / steps).clamp(lo, hi)
    return torch.unique(t)


def _noise_of(model: Model) -> Denoiser:
    if not isinstance(model, Model):
        raise OptionError(f"lipschitz: model={model!r} is not a solverlab.Model; wrap a network "
                          "with solverlab.TorchModel(module, schedule, parameterization, "
                          "time_input=..., time_map=...)")
    return Denoiser(model)


def _check_x0(x0: Any) -> Tensor:
    x0 = _tensor("lipschitz", "x0", x0)
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise InputError(f"lipschitz: x0 has shape {tuple(x0.shape)}; give a batch of clean "
                         "data (n, ...) with n >= 1")
    if not x0.is_floating_point():
        x0 = x0.to(torch.float32)
    _finite("lipschitz", "x0", x0)
    return x0


def _check_times(schedule: Schedule, ts: Any, dt: float) -> Tensor:
    ts = _tensor("lipschitz", "ts", ts).detach().to("cpu", F64).reshape(-1)
    if ts.numel() < 1:
        raise InputError("lipschitz: ts is empty; give at least one time")
    _finite("lipschitz", "ts", ts)
    lo, hi = schedule.t_min, schedule.t_max
    slack = 1e-12 * max(1.0, abs(hi))
    bad = (ts < lo - slack) | (ts + dt > hi + slack)
    if bool(bad.any()):
        t = float(ts[bad][0])
        raise InputError(f"lipschitz: ts holds t={t!r}; every t must satisfy t_min <= t and "
                         f"t + dt <= t_max, i.e. lie in [{lo!r}, {hi - dt!r}] (dt={dt!r})")
    return ts


def lipschitz_values(model: Model, x0: Any, ts: Any, dt: float, *, noise_seed: int = 0,
                     ) -> tuple[Tensor, Tensor]:
    """``(K, K_sem)``, float64 ``(len(ts),)``: for each ``t``, the mean over ``x0`` of
    ``||eps(x, t + dt) - eps(x, t)||_2 / dt`` and its standard error, where
    ``x = alpha_t x0 + sigma_t z`` and ``z`` is one fixed draw per ``x0`` (seeded with
    ``noise_seed``). Both evaluations see the same ``x``: only the time condition changes.

    ``eps`` is the model's noise prediction (:meth:`Denoiser.noise`, which converts other
    parameterizations at the evaluation's own time), and the model feeds its network exactly
    as when sampling (its ``time_map`` included). Each time takes two model calls on the whole
    batch, with the same shapes, so a network whose input is unchanged gives bitwise equal
    outputs and ``K = 0`` exactly.
    """
    den = _noise_of(model)
    x0 = _check_x0(x0)
    dt = _float_option("lipschitz", "dt", dt, gt=0)
    noise_seed = _int_option("lipschitz", "noise_seed", noise_seed, 0)
    ts = _check_times(model.schedule, ts, dt)
    gen = torch.Generator().manual_seed(noise_seed)
    z = torch.randn(x0.shape, generator=gen, dtype=F64).to(x0.device, x0.dtype)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    k = torch.empty(ts.numel(), dtype=F64)
    sem = torch.empty(ts.numel(), dtype=F64)
    b = x0.shape[0]
    sched = model.schedule
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            t0 = torch.full((b,), t, dtype=F64, device=x0.device)
            t1 = torch.full((b,), t + dt, dtype=F64, device=x0.device)
            alpha = sched.alpha(t0).to(x0.dtype).view(shape)
            sigma = sched.sigma(t0).to(x0.dtype).view(shape)
            x = alpha * x0 + sigma * z
            diff = (den.noise(x, t1) - den.noise(x, t0)).flatten(1).to(F64).norm(dim=1) / dt
            if not bool(torch.isfinite(diff).all()):
                raise ModelOutputError(
                    f"lipschitz: the model's noise prediction is NaN or infinite at t={t!r} or "
                    f"t + dt={t + dt!r}; check the model and its time range")
            k[i] = diff.mean()
            sem[i] = diff.std() / math.sqrt(b) if b > 1 else 0.0
    return k, sem


def _network_to_physical(model: Model, s: float) -> float:
    """The physical time at which the model's network time input equals ``s``."""
    sched = model.schedule
    kind = getattr(model, "time_input", "t")
    if kind == "index":
        return float(sched.t_of_index(s))
    if kind == "sigma":
        return float(sched.t_of_lambda(torch.tensor(-math.log(s), dtype=F64)))
    return float(s)


def _jump_pairs(model: Model, dt: float) -> list[dict[str, float]]:
    """For each interior boundary of the model's time map: the boundary's network time, its
    physical time and the start ``t_eval`` of the step ``[t_eval, t_eval + dt]`` that straddles
    it (for a discrete schedule the pair of nodes around it; else centred on it)."""
    time_map = getattr(model, "time_map", None)
    if time_map is None:
        return []
    sched = model.schedule
    steps = discrete_steps(sched)
    out = []
    for s in time_map.boundaries[1:]:
        tb = _network_to_physical(model, s)
        if steps is not None and getattr(model, "time_input", "t") == "index":
            k = math.ceil(s - 1e-9) - 1  # nodes k, k+1 with k < s <= k+1
            t_eval = float(sched.t_of_index(k))
        else:
            t_eval = tb - 0.5 * dt
        if t_eval < sched.t_min - 1e-12 or t_eval + dt > sched.t_max + 1e-12:
            continue
        out.append({"t": tb, "network_time": float(s), "t_eval": t_eval})
    return out


def lipschitz_profile(model: Model, x0: Any, ts: Any = None, dt: float | None = None, *,
                      noise_seed: int = 0, points: int = 128) -> dict[str, Any]:
    """The Lipschitz profile ``K(t)`` of ``model``'s noise prediction in time on ``x0`` (clean
    data, ``(n, ...)``), as the finite-difference estimate of Yang et al. 2024 (E-TSDM) plots it
    (:func:`lipschitz_values`: the same noised input for both evaluations).

    ``ts``: times (default :func:`lipschitz_grid` with ``points`` points: dense near 0, the
    discrete nodes of a ``vp-discrete`` schedule); ``dt``: the step (default one discrete step
    ``1/N``, else ``1e-3`` of the time range).

    A model with a ``time_map`` (timestep sharing) has ``K = 0`` inside each shared
    sub-interval and its change concentrated at the boundaries; they are reported apart:
    ``boundaries`` (physical times of the map's interior boundaries, network time ``s`` to ``t``:
    ``(s+1)/N`` for index models) and ``jumps`` (for each boundary, ``K`` over the step
    ``[t_eval, t_eval + dt]`` that straddles it, evaluated even if ``ts`` misses it).

    ``ts`` are sorted and duplicates dropped. Returns a JSON-ready dict: ``t``, ``K``,
    ``K_sem`` (standard error over ``x0``), ``dt``, ``same_network_time`` (per ``t``: does the
    network get the same time input at ``t`` and ``t + dt``; there ``K = 0`` exactly for a
    noise-prediction network), ``boundaries``, ``jumps`` (``t``, ``network_time``, ``t_eval``,
    ``K``, ``K_sem``), ``samples``, ``noise_seed``, ``nfe`` (model calls, each on the whole
    batch: two per time), ``model``, ``schedule``, ``parameterization``, ``time_input``,
    ``time_map``, ``definition``.
    """
    _noise_of(model)
    sched = model.schedule
    dt = _default_dt(sched) if dt is None else _float_option("lipschitz", "dt", dt, gt=0)
    if ts is None:
        ts = lipschitz_grid(sched, points, dt=dt)
    ts = torch.unique(_check_times(sched, ts, dt))
    x0 = _check_x0(x0)
    k, sem = lipschitz_values(model, x0, ts, dt, noise_seed=noise_seed)
    pairs = _jump_pairs(model, dt)
    jumps = []
    if pairs:
        jk, jsem = lipschitz_values(model, x0, [p["t_eval"] for p in pairs], dt,
                                    noise_seed=noise_seed)
        jumps = [{**p, "K": float(v), "K_sem": float(e)} for p, v, e in zip(pairs, jk, jsem)]
    time_map = getattr(model, "time_map", None)
    nfe = 2 * (ts.numel() + len(pairs))
    return {
        "t": ts.tolist(), "K": k.tolist(), "K_sem": sem.tolist(), "dt": dt,
        "same_network_time": _same_input(model, ts, dt),
        "boundaries": [p["t"] for p in pairs], "jumps": jumps,
        "samples": int(x0.shape[0]), "noise_seed": noise_seed, "nfe": nfe,
        "model": repr(model), "schedule": getattr(sched, "name", type(sched).__name__),
        "parameterization": model.parameterization.name,
        "time_input": getattr(model, "time_input", "t"),
        "time_map": None if time_map is None else time_map.to_dict(),
        "definition": LIPSCHITZ_DEFINITION,
    }


def _k_at(profile: Mapping[str, Any], t: float) -> float | None:
    for ti, ki in zip(profile["t"], profile["K"]):
        if abs(ti - t) <= 1e-12 * max(1.0, abs(t)):
            return ki
    return None


def _same_input(model: Model, ts: Tensor, dt: float) -> list[bool]:
    """For each ``t``: does the network get the same time input at ``t`` and ``t + dt``
    (both inside one shared sub-interval of the model's time map)? Compared in float64."""
    network_time = getattr(model, "network_time", None)
    if getattr(model, "time_map", None) is None or not callable(network_time):
        return [False] * ts.numel()
    with torch.no_grad():
        return (network_time(ts) == network_time(ts + dt)).tolist()


def _largest(ts: Sequence[float], ks: Sequence[float], end: float | None,
             ) -> tuple[float, float | None]:
    """The largest ``K`` at times ``t < end`` (all when ``end`` is ``None``) and its time."""
    pts = [(k, t) for t, k in zip(ts, ks) if end is None or t < end]
    return max(pts) if pts else (0.0, None)


def lipschitz_comparison(result: Mapping[str, Any], plain: Mapping[str, Any] | None = None,
                         ) -> dict[str, Any]:
    """What a timestep-shared profile ``result`` shows, and how it compares with ``plain``
    (the same probe on a model without sharing, ideally on the same ``t`` plus the jumps'
    ``t_eval``, as :func:`run_lipschitz` does).

    Returns ``inside_steps`` (grid steps whose two times give the network the same input) and
    ``inside_zero`` (how many of them have ``K = 0``), ``region_end`` (the last boundary:
    the shared region is ``t < region_end``; ``None`` without a time map: everything),
    ``max_K`` and ``max_K_at`` (over the grid and the jumps in the region), ``plain_max_K``
    and ``plain_max_K_at`` (the plain model in the same region), ``jumps`` (each jump's ``K``
    next to the plain model's ``K`` over the same step and their ratio) and ``summary``
    (sentences).

    Sharing moves the change of ``eps`` in ``t`` into the boundary steps: it can remove a
    blow-up near ``t = 0`` and still leave jumps as large as (or larger than) the plain
    model's largest ``K``; the summary says which happened, with the numbers.
    """
    inside = [i for i, same in enumerate(result.get("same_network_time", [])) if same]
    zeros = sum(1 for i in inside if result["K"][i] == 0.0)
    jumps = result["jumps"]
    end = max(j["t"] for j in jumps) if jumps else None
    shared_k, shared_at = _largest([*result["t"], *(j["t_eval"] for j in jumps)],
                                   [*result["K"], *(j["K"] for j in jumps)], end)
    out: dict[str, Any] = {
        "inside_steps": len(inside), "inside_zero": zeros, "region_end": end,
        "max_K": shared_k, "max_K_at": shared_at, "plain_max_K": None, "plain_max_K_at": None,
        "jumps": [], "summary": [],
    }
    lines = out["summary"]
    where = f"t < {end:.6g}" if end is not None else "the probed range"
    is_jump = any(j["t_eval"] == shared_at and j["K"] == shared_k for j in jumps)
    if jumps:
        lines.append(f"inside the shared sub-intervals K = 0 at {zeros} of {len(inside)} grid "
                     "steps; the change of eps is concentrated in the steps across the "
                     f"{len(jumps)} boundaries")
    if plain is None:
        if jumps:
            big = max(jumps, key=lambda j: j["K"])
            lines.append(f"largest jump: K = {big['K']:.4g} across t = {big['t']:.6g}")
        return out
    plain_k, plain_at = _largest(plain["t"], plain["K"], end)
    out["plain_max_K"], out["plain_max_K_at"] = plain_k, plain_at
    for j in jumps:
        pk = _k_at(plain, j["t_eval"])
        out["jumps"].append({"t": j["t"], "K": j["K"], "plain_K": pk,
                             "ratio": None if not pk else j["K"] / pk})
    at = "" if plain_at is None else f" (the step from t = {plain_at:.6g})"
    lines.append(f"largest K for {where}: {shared_k:.4g} with sharing "
                 f"({'a jump' if is_jump else 'on the grid'}"
                 + ("" if shared_at is None else f", the step from t = {shared_at:.6g}")
                 + f") vs {plain_k:.4g} without{at}")
    ratios = [r["ratio"] for r in out["jumps"] if r["ratio"] is not None]
    if ratios:
        lines.append(f"across the boundaries the shared model's K is {min(ratios):.3g}x to "
                     f"{max(ratios):.3g}x the plain model's K over the same step")
    if plain_k <= 0:
        lines.append(f"the plain model's K is 0 for {where}: nothing to compare")
    elif shared_k < plain_k:
        lines.append(f"sharing lowered the largest K for {where} by a factor "
                     f"{plain_k / shared_k:.3g}" if shared_k > 0 else
                     f"sharing removed every change in t for {where}")
    else:
        lines.append(f"sharing did not lower the largest K for {where}: it is "
                     f"{shared_k / plain_k:.3g}x the plain model's"
                     + (", at a boundary: the change in t was traded for jumps" if is_jump
                        else ""))
    return out


def _map_text(time_map: Mapping[str, Any] | None) -> str:
    if not time_map:
        return ""
    return (f", shared time map: threshold {time_map['threshold']:g}, {time_map['n']} "
            "sub-intervals (network time)")


def _lipschitz_figure(result: Mapping[str, Any], plain: Mapping[str, Any] | None) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    positive = [k for k in result["K"] if k > 0] + [j["K"] for j in result["jumps"] if j["K"] > 0]
    if plain is not None:
        positive += [k for k in plain["K"] if k > 0]
    floor = min(positive) if positive else 1.0
    top = max(positive) if positive else 1.0
    tb = result["boundaries"]
    ts = result["t"]
    # the zoom: to 1.5x the last boundary, else the first fifth of the probed range
    zoom_end = max(tb) * 1.5 if tb else (ts[0] + 0.2 * (ts[-1] - ts[0]) if ts else None)
    for ax, zoom in zip(axes, (False, True)):
        def keep(t: float, zoom: bool = zoom) -> bool:
            return not zoom or zoom_end is None or t <= zoom_end

        if plain is not None:
            pts = [(t, k) for t, k in zip(plain["t"], plain["K"]) if keep(t)]
            if pts:
                ax.plot(*zip(*pts), "-", color="0.55", label="plain (compare)")
        pts = [(t, k) for t, k in zip(result["t"], result["K"]) if keep(t)]
        if pts:
            ax.plot(*zip(*pts), ".-", color="C0", label="K(t) on the grid", markersize=4)
        jumps = [(j["t_eval"], j["K"]) for j in result["jumps"] if keep(j["t_eval"])]
        if jumps:
            ax.plot(*zip(*jumps), "v", color="C3", label="K across a boundary (jump)")
        for i, b in enumerate(tb):
            if keep(b):
                ax.axvline(b, color="C3", linestyle=":", linewidth=1,
                           label="sub-interval boundary" if i == 0 else None)
        # symlog: K = 0 inside shared sub-intervals stays visible on the axis
        ax.set_yscale("symlog", linthresh=floor)
        ax.set_ylim(0.0, 3.0 * top)
        ax.set_xlabel("t")
        ax.grid(True, which="both", alpha=0.3)
        if zoom:
            ax.set_xscale("linear")
            ax.set_title("near t = 0 (to 1.5x the last boundary)" if tb else "near t = 0")
        else:
            ax.set_xscale("log")
            ax.set_title("whole range (log t)")
    axes[0].set_ylabel("K(t) = E||eps(x,t+dt) - eps(x,t)|| / dt")
    axes[0].legend(fontsize="small", loc="best")
    fig.suptitle(f"Lipschitz constant in t: {result['schedule']}, dt = {result['dt']:.3g}, "
                 f"{result['samples']} samples" + _map_text(result.get("time_map")),
                 fontsize="medium")
    fig.tight_layout()
    return fig


def lipschitz_report(result: Mapping[str, Any], out_dir: str | Path, *,
                     compare_with: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``lipschitz.json`` (``result`` with ``compare`` and ``comparison``),
    ``lipschitz.csv`` (one row per grid time and per jump: ``kind`` ``grid``/``jump``,
    ``t``, ``K``, ``K_sem``, the straddled ``boundary``, and ``K_compare`` from
    ``compare_with``) and ``lipschitz.png`` (K against t, whole range on log t and a zoom near
    0, boundaries as dotted lines, the compared profile in grey) into ``out_dir``, replaced as
    one set (:func:`solverlab._io.atomic_folder`; the folder may hold only these files).
    Returns the paths by kind."""
    out_dir = Path(out_dir)
    data = {**result, "compare": None if compare_with is None else dict(compare_with),
            "comparison": lipschitz_comparison(result, compare_with)}
    rows = []
    for t, k, e in zip(result["t"], result["K"], result["K_sem"]):
        rows.append({"kind": "grid", "t": t, "K": k, "K_sem": e, "boundary": None,
                     "K_compare": None if compare_with is None else _k_at(compare_with, t)})
    for j in result["jumps"]:
        rows.append({"kind": "jump", "t": j["t_eval"], "K": j["K"], "K_sem": j["K_sem"],
                     "boundary": j["t"],
                     "K_compare": (None if compare_with is None
                                   else _k_at(compare_with, j["t_eval"]))})
    rows.sort(key=lambda r: (r["t"], r["kind"]))
    names = dict(zip(("json", "csv", "png"), LIPSCHITZ_OUTPUTS))
    fig = _lipschitz_figure(result, compare_with)
    with _io.atomic_folder(out_dir, owned=LIPSCHITZ_OUTPUTS) as tmp:
        _io.write_json(tmp / names["json"], data)
        _io.write_csv(tmp / names["csv"], rows,
                      ["kind", "t", "K", "K_sem", "boundary", "K_compare"])
        _io.write_figure(tmp / names["png"], fig, dpi=120)
    return {kind: out_dir / name for kind, name in names.items()}


def run_lipschitz(model: Model, x0: Any, out_dir: str | Path, *, points: int = 128,
                  dt: float | None = None, compare: Model | None = None, seed: int = 0,
                  ) -> dict[str, Any]:
    """What ``solverlab lipschitz`` runs: :func:`lipschitz_profile` of ``model`` on clean data
    ``x0`` (noise seeded with ``seed``), on ``points`` grid times; with ``compare`` (e.g. the
    same network trained without timestep sharing) the same probe on the same ``x0``, noise,
    grid and ``dt`` plus the steps across ``model``'s boundaries; then :func:`lipschitz_report`
    into ``out_dir``. Returns what ``lipschitz.json`` holds plus ``files`` (the paths)."""
    result = lipschitz_profile(model, x0, None, dt, noise_seed=seed, points=points)
    plain = None
    if compare is not None:
        ts = sorted(set(result["t"]) | {j["t_eval"] for j in result["jumps"]})
        try:
            plain = lipschitz_profile(compare, x0, ts, result["dt"], noise_seed=seed)
        except SolverlabError as e:
            raise type(e)(f"compare model: {e}") from None
    paths = lipschitz_report(result, out_dir, compare_with=plain)
    return {**result, "compare": plain, "comparison": lipschitz_comparison(result, plain),
            "files": {k: str(v) for k, v in paths.items()}}


# -- python -m solverlab.metrics -------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m solverlab.metrics train-classifier [--out PATH] [--seed S] [--steps N]``:
    train the digits classifier (:func:`train_digits_classifier`) and print its metadata; the
    default ``--out`` is the shipped file inside the package."""
    parser = argparse.ArgumentParser(prog="python -m solverlab.metrics")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-classifier", help="train the shipped digits classifier")
    default_out = Path(__file__).resolve().parent / CLASSIFIER_FILE
    train.add_argument("--out", type=Path, default=default_out)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    command = ("python -m solverlab.metrics train-classifier --seed "
               f"{args.seed} --steps {args.steps}")
    if args.out != default_out:
        command += f" --out {args.out}"
    try:
        meta = train_digits_classifier(args.out, seed=args.seed, steps=args.steps,
                                       command=command)
    except SolverlabError as e:
        print(f"Error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
