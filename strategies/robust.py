"""Robust aggregation: the math, as pure numpy functions (no Flower).

A malicious client can send any finite update. Three defences, composable:

- **an absolute cap** (``update-max-abs``): an update with any value larger in magnitude
  is rejected. It needs nothing but the update itself, so it also holds when a round has
  a single reply, and it keeps every aggregate finite;
- **a norm bound relative to the round** (``update-norm-bound``): an update whose change
  (what it sends minus what the node was sent, one L2 norm over all those tensors) is
  more than ``bound`` times the median change of the round's updates is rejected;
- **a direction screen** (``update-min-cosine``, ``update-cosine-ratio``): an update
  whose change points away from the round's coordinate-wise median change is rejected:
  its cosine with it is below ``update-min-cosine`` (0 by default: against it) or below
  ``update-cosine-ratio`` (0.5) times the round's median cosine (far less aligned than a
  typical update). It catches what keeps an honest norm, a sign-flipped update or noise
  in place of training, while the attackers are fewer than half;
- **a robust aggregator** (``aggregator``) in place of the weighted mean, applied to the
  tensors the strategy averages: the coordinate-wise ``median``, the coordinate-wise
  ``trimmed-mean``, or ``norm-clip`` (each change clipped to a norm, then the mean with
  weights capped at the round's median example count).

:class:`RobustConfig` holds and validates the settings; the functions below are what
:mod:`strategies.base` applies to a round's updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from strategies.config import check, setting

MEAN, MEDIAN, TRIMMED_MEAN, NORM_CLIP = "mean", "median", "trimmed-mean", "norm-clip"
AGGREGATORS = (MEAN, MEDIAN, TRIMMED_MEAN, NORM_CLIP)
#: aggregators that combine the clients' tensors coordinate by coordinate
COORDINATE_WISE = frozenset({MEDIAN, TRIMMED_MEAN})

DEFAULT_NORM_BOUND = 10.0
DEFAULT_MAX_ABS = 1e4
DEFAULT_TRIM_FRACTION = 0.2
DEFAULT_MIN_COSINE = 0.0
DEFAULT_COSINE_RATIO = 0.5


@dataclass(frozen=True)
class RobustConfig:
    """The robust-aggregation settings of a strategy.

    Attributes:
        aggregator: ``mean`` (the strategy's own weighted mean), ``median``,
            ``trimmed-mean`` or ``norm-clip``.
        trim_fraction: ``trimmed-mean``: the share of values dropped at each end of every
            coordinate (at least one per side from three updates on; see :func:`trim_count`).
        clip_norm: ``norm-clip``: the L2 norm each change is clipped to; 0 = the median
            change norm of the round's accepted updates.
        update_norm_bound: reject an update whose change norm exceeds this many times the
            round's median change norm; 0 = off, else at least 1.
        update_max_abs: reject an update with any value above this in magnitude; 0 = off.
        update_min_cosine: reject an update whose change has a cosine below this with the
            round's coordinate-wise median change (:func:`median_direction_cosines`);
            -1 = off (the whole direction screen).
        update_cosine_ratio: with the direction screen on, also reject an update whose
            cosine is below this fraction of the round's median cosine; 0 = only the
            absolute threshold.

    Raises:
        ValueError: a setting out of range, naming it and what it accepts.

    """

    aggregator: str = setting(MEAN, "mean | median | trimmed-mean | norm-clip")
    trim_fraction: float = setting(
        DEFAULT_TRIM_FRACTION, "trimmed-mean: share of values dropped per side")
    clip_norm: float = setting(
        0.0, "norm-clip: the L2 norm each change is clipped to (0 = the round's median)")
    update_norm_bound: float = setting(
        DEFAULT_NORM_BOUND,
        "reject an update whose change norm is above this many times the round's median "
        "(0 = off)")
    update_max_abs: float = setting(
        DEFAULT_MAX_ABS, "reject an update holding a value larger in magnitude (0 = off)")
    update_min_cosine: float = setting(
        DEFAULT_MIN_COSINE,
        "reject an update whose change has a cosine below this with the round's median "
        "change (-1 = off)")
    update_cosine_ratio: float = setting(
        DEFAULT_COSINE_RATIO,
        "also reject a cosine below this share of the round's median cosine (0 = off)")

    def __post_init__(self) -> None:
        checks = [
            (self.aggregator in AGGREGATORS,
             f"aggregator must be one of {', '.join(AGGREGATORS)}, got '{self.aggregator}'"),
            (math.isfinite(self.trim_fraction) and 0 <= self.trim_fraction < 0.5,
             f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}"),
            (math.isfinite(self.clip_norm) and self.clip_norm >= 0,
             f"clip-norm must be a finite number >= 0 (0 = the round's median norm), got "
             f"{self.clip_norm}"),
            (self.update_norm_bound == 0 or (math.isfinite(self.update_norm_bound)
                                             and self.update_norm_bound >= 1),
             f"update-norm-bound must be 0 (off) or a finite number >= 1 (a multiple of the "
             f"round's median update norm), got {self.update_norm_bound}"),
            (math.isfinite(self.update_max_abs) and self.update_max_abs >= 0,
             f"update-max-abs must be a finite number >= 0 (0 = off), got "
             f"{self.update_max_abs}"),
            (-1 <= self.update_min_cosine < 1,
             f"update-min-cosine must be in [-1, 1) (-1 = off), got {self.update_min_cosine}"),
            (0 <= self.update_cosine_ratio < 1,
             f"update-cosine-ratio must be in [0, 1) (0 = off), got {self.update_cosine_ratio}"),
        ]
        for ok, message in checks:
            check(ok, message)

    @property
    def holds_round(self) -> bool:
        """Whether the round's updates must all be in before any is aggregated."""
        return (self.update_norm_bound > 0 or self.aggregator != MEAN
                or self.update_min_cosine > -1)

    def describe(self) -> str:
        """One line for the logs."""
        parts = [f"aggregator {self.aggregator}"]
        if self.aggregator == TRIMMED_MEAN:
            parts.append(f"trim fraction {self.trim_fraction:g}")
        if self.aggregator == NORM_CLIP:
            parts.append(f"clip norm {self.clip_norm:g}" if self.clip_norm
                         else "clip to the median norm")
        parts.append(f"norm bound {self.update_norm_bound:g} x median"
                     if self.update_norm_bound else "no norm bound")
        parts.append(f"max |value| {self.update_max_abs:g}" if self.update_max_abs
                     else "no value cap")
        parts.append(f"min cosine {self.update_min_cosine:g} and {self.update_cosine_ratio:g} "
                     "x the round's median cosine with the median change"
                     if self.update_min_cosine > -1 else "no direction screen")
        return "robust aggregation: " + ", ".join(parts)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def leading_block(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The leading ``shape`` block of ``array`` (a view): what a lower-rank tensor starts from.

    Raises:
        ValueError: ``shape`` has another number of dimensions or exceeds ``array``.

    """
    _check(len(shape) == array.ndim and all(s <= a for s, a in zip(shape, array.shape,
                                                                    strict=True)),
           f"a tensor of shape {shape} does not fit the sent tensor of shape {array.shape}")
    return array[tuple(slice(0, s) for s in shape)]


def pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` zero-padded at the end of each axis to ``shape`` (itself when it fits).

    A lower-rank LoRA factor padded to the global rank: ``A`` gets zero rows, ``B`` zero
    columns, as HetLoRA's aggregation pads them.
    """
    if tuple(array.shape) == tuple(shape):
        return array
    _check(len(shape) == array.ndim and all(a <= s for a, s in zip(array.shape, shape,
                                                                    strict=True)),
           f"a tensor of shape {array.shape} cannot be padded to {shape}")
    return np.pad(array, [(0, s - a) for a, s in zip(array.shape, shape, strict=True)])


def max_abs(state: Mapping[str, np.ndarray]) -> tuple[str, float]:
    """The key holding the largest magnitude in ``state``, and that magnitude (``("", 0)``)."""
    key, largest = "", 0.0
    for name, value in state.items():
        if value.size:
            top = float(np.max(np.abs(value)))
            if top > largest or not math.isfinite(top):
                key, largest = name, top
    return key, largest


def change_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``update - reference`` over all of the update's tensors, in float64.

    Tensors are paired by key; a tensor smaller than its reference (a client that pruned
    its rank) is compared with the reference's leading block.

    Raises:
        ValueError: a key of ``update`` has no reference, or a shape does not fit.

    """
    missing = sorted(set(update) - set(reference))
    _check(not missing, f"update tensors {missing[:5]} were not sent to the client")
    squared = 0.0
    for key, value in update.items():
        base = leading_block(reference[key], tuple(value.shape))
        change = value.astype(np.float64).ravel() - base.astype(np.float64).ravel()
        squared += float(np.dot(change, change))
    return math.sqrt(squared)


def scale_change(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 factor: float) -> dict[str, np.ndarray]:
    """``reference + factor * (update - reference)`` per key, in each update tensor's dtype.

    ``factor = 1`` returns the update's own arrays. Shapes pair as in :func:`change_norm`.
    """
    if factor == 1.0:
        return dict(update)
    out = {}
    for key, value in update.items():
        ref = leading_block(reference[key], tuple(value.shape)).astype(np.float64)
        out[key] = (ref + factor * (value.astype(np.float64) - ref)).astype(value.dtype)
    return out


def norm_threshold(norms: Sequence[float], bound: float) -> float | None:
    """``bound`` x the median of ``norms``: the largest change norm the round accepts.

    None when there is nothing to compare with: no norms, ``bound = 0`` (off), or a median
    of 0 (most updates did not move; a multiple of 0 would reject every update that did).
    """
    if bound <= 0 or not norms:
        return None
    median = float(np.median(np.asarray(norms, dtype=np.float64)))
    return bound * median if median > 0 else None


def clip_factors(norms: Sequence[float], clip_norm: float) -> list[float]:
    """Per norm, ``min(1, clip_norm / norm)``: the factor that clips a change to ``clip_norm``.

    Raises:
        ValueError: ``clip_norm`` is negative.

    """
    _check(clip_norm >= 0, f"clip-norm must not be negative, got {clip_norm}")
    return [1.0 if n <= clip_norm else clip_norm / n for n in norms]


def capped_counts(counts: Sequence[int]) -> list[int]:
    """Each example count capped at the median count (at least 1).

    A client reporting a huge count then weighs no more than a typical one; counts at or
    below the median are unchanged.
    """
    if not counts:
        return []
    cap = max(1, int(np.median(np.asarray(counts, dtype=np.float64))))
    return [min(int(c), cap) for c in counts]


def trim_count(n: int, fraction: float) -> int:
    """How many values ``trimmed-mean`` drops at each end of a coordinate with ``n`` values.

    ``ceil(fraction * n)``, at most ``(n - 1) // 2`` so that at least one value remains; so
    with ``fraction > 0`` one value per side is dropped from three updates on (``n = 4``:
    1, the mean of the middle two; ``n = 8`` at 0.2: 2), and none with one or two updates.
    """
    _check(n >= 1, f"a trimmed mean needs at least one value, got {n}")
    _check(0 <= fraction < 0.5, f"trim-fraction must be in [0, 0.5), got {fraction}")
    return min(math.ceil(fraction * n - 1e-9), (n - 1) // 2)


def _stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    _check(len(arrays) > 0, "a robust aggregate needs at least one array")
    shapes = {tuple(a.shape) for a in arrays}
    _check(len(shapes) == 1, f"arrays to combine must share one shape, got {sorted(shapes)}")
    return np.stack([np.asarray(a, dtype=np.float64) for a in arrays])


def coordinate_median(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The coordinate-wise median (unweighted), in float64, returned in the first's dtype.

    With an even number of arrays, a coordinate's median is the mean of its two middle
    values (numpy's convention).
    """
    return np.median(_stack(arrays), axis=0).astype(arrays[0].dtype)


def trimmed_mean(arrays: Sequence[np.ndarray], fraction: float) -> np.ndarray:
    """The coordinate-wise trimmed mean (unweighted), in the first array's dtype.

    Per coordinate the ``k`` largest and ``k`` smallest values are dropped
    (``k = trim_count(n, fraction)``) and the rest averaged in float64.
    """
    stacked = _stack(arrays)
    k = trim_count(len(arrays), fraction)
    kept = np.sort(stacked, axis=0)[k:len(arrays) - k]
    return kept.mean(axis=0).astype(arrays[0].dtype)


def combine(arrays: Sequence[np.ndarray], aggregator: str, trim_fraction: float) -> np.ndarray:
    """The coordinate-wise aggregate of ``arrays`` for ``median`` or ``trimmed-mean``.

    Raises:
        ValueError: ``aggregator`` is not coordinate-wise.

    """
    if aggregator == MEDIAN:
        return coordinate_median(arrays)
    if aggregator == TRIMMED_MEAN:
        return trimmed_mean(arrays, trim_fraction)
    raise ValueError(f"'{aggregator}' is not a coordinate-wise aggregator "
                     f"({', '.join(sorted(COORDINATE_WISE))})")


def cosine_threshold(cosines: Sequence[float], min_cosine: float, ratio: float) -> float:
    """The least cosine the round accepts.

    ``min_cosine``, or ``ratio`` x the round's median cosine when that is higher: a round
    whose updates are well aligned asks more of each.
    """
    if not cosines or ratio <= 0:
        return min_cosine
    return max(min_cosine, ratio * float(np.median(np.asarray(cosines, dtype=np.float64))))


def median_direction_cosines(updates: Sequence[Mapping[str, np.ndarray]],
                             references: Sequence[Mapping[str, np.ndarray]],
                             shapes: Mapping[str, tuple[int, ...]]) -> list[float]:
    """Per update, the cosine between its change and the coordinate-wise median change.

    The change of update ``i`` is ``updates[i] - references[i]`` (a lower-rank tensor
    against the leading block of its reference), zero-padded to ``shapes[key]`` so that
    updates of different ranks share one space. Per key, the median runs over the updates
    that carry it; the cosine is over all of an update's keys, in float64. An update with
    no change, or a round whose median change is zero, gets 1.0 (nothing to judge by).

    With fewer than half of the updates adversarial, the median change is bounded by the
    honest ones' coordinates, so a change pointing against it (a negative cosine) points
    against what the honest majority did.

    Raises:
        ValueError: a key has no reference or shape, or a tensor does not fit.

    """
    _check(len(updates) == len(references), "one reference per update is needed")
    n = len(updates)
    dots, own, med = np.zeros(n), np.zeros(n), np.zeros(n)
    keys = dict.fromkeys(k for u in updates for k in u)
    for key in keys:
        _check(key in shapes, f"no shape for tensor '{key}'")
        rows, changes = [], []
        for i, (update, reference) in enumerate(zip(updates, references, strict=True)):
            if key not in update:
                continue
            _check(key in reference, f"tensor '{key}' was not sent to the client")
            value = update[key]
            base = leading_block(reference[key], tuple(value.shape))
            change = value.astype(np.float64) - base.astype(np.float64)
            rows.append(i)
            changes.append(pad_to(change, tuple(shapes[key])).ravel())
        stacked = np.stack(changes)
        median = np.median(stacked, axis=0)
        median_sq = float(np.dot(median, median))
        for row, change in zip(rows, stacked, strict=True):
            dots[row] += float(np.dot(change, median))
            own[row] += float(np.dot(change, change))
            med[row] += median_sq
    return [float(d / math.sqrt(a * m)) if a > 0 and m > 0 else 1.0
            for d, a, m in zip(dots, own, med, strict=True)]
