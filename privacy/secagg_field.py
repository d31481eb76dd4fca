"""Fixed-point encoding of an update into the ring secure aggregation sums in.

A client clips every value to ``[-c, c]`` (``secagg-clip-range``), rounds it to one of
``2L + 1`` levels, ``L = 2^(b-1) - 1`` for ``b = secagg-bits`` (step ``c / L``),
multiplies the integer by its weight ``w`` (its example count, at most
``secagg-max-weight``), and adds the result in the ring ``Z_{2^R}`` (two's complement:
negative values wrap). Its vector ends with three scalars summed the same way: the
weighted train loss (on its own scale, ``[0, LOSS_RANGE]``), the number of values it
clipped, and the weight itself.

The server picks ``R`` (32 or 64 bits, the narrower when it fits) so that the sum of
the round's clients cannot wrap: ``clients x W x L < 2^(R-1)``. After unmasking, it
reads the sum as signed integers and divides by the summed weight: the weighted mean of
the clients' values, each within half a step, ``c / (2L)``, of the exact mean of the
clipped values (:func:`FieldSpec.rounding_error`). With ``c = 1`` and ``b = 16`` that is
``1.5e-5`` per coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the train loss is summed on this scale (losses above it are clipped)
LOSS_RANGE = 64.0
#: scalars at the end of every vector: weighted loss, clipped count, weight
TAIL = 3
RING_BITS = (32, 64)


class FieldError(ValueError):
    """Values that cannot be encoded, or a sum that cannot be an honest one."""


@dataclass(frozen=True)
class FieldSpec:
    """How a round's updates are encoded: clip range, bits, weight cap, ring width."""

    clip_range: float
    bits: int
    max_weight: int
    ring_bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise FieldError(f"secagg-clip-range must be positive, got {self.clip_range}")
        if not 2 <= self.bits <= 48:
            raise FieldError(f"secagg-bits must be in 2..48, got {self.bits}")
        if self.max_weight < 1:
            raise FieldError(f"secagg-max-weight must be at least 1, got {self.max_weight}")
        if self.ring_bits not in RING_BITS:
            raise FieldError(f"the ring has 32 or 64 bits, got {self.ring_bits}")

    @classmethod
    def for_clients(cls, clip_range: float, bits: int, max_weight: int,
                    clients: int) -> FieldSpec:
        """The narrowest ring in which ``clients`` weighted vectors cannot overflow.

        Raises:
            FieldError: not even 64 bits suffice (fewer bits or a lower weight cap do).

        """
        levels = 2 ** (bits - 1) - 1
        for ring in RING_BITS:
            if max(clients, 1) * max_weight * max(levels, 1) < 2 ** (ring - 1):
                return cls(clip_range, bits, max_weight, ring)
        raise FieldError(f"{clients} clients x secagg-max-weight {max_weight} x 2^{bits - 1} "
                         "levels overflow a 64-bit ring; lower secagg-bits or "
                         "secagg-max-weight")

    @property
    def dtype(self) -> np.dtype:
        """The ring's element type (arithmetic wraps modulo ``2^R``)."""
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    @property
    def levels(self) -> int:
        """``L``: values map to integers in ``[-L, L]``."""
        return 2 ** (self.bits - 1) - 1

    @property
    def step(self) -> float:
        """The value of one quantization level, ``c / L``."""
        return self.clip_range / self.levels

    def rounding_error(self) -> float:
        """The largest error of a dequantized mean coordinate (clipped values aside)."""
        return self.step / 2

    def encode(self, values: np.ndarray, weight: int, loss: float) -> np.ndarray:
        """A client's vector: weighted quantized values, then loss, clipped count, weight.

        Raises:
            FieldError: a weight outside ``[1, max_weight]`` or a value not finite.

        """
        if not 1 <= weight <= self.max_weight:
            raise FieldError(f"weight {weight} outside [1, {self.max_weight}]")
        flat = np.asarray(values, dtype=np.float64).ravel()
        if not np.isfinite(flat).all():
            raise FieldError("an update holds NaN or Inf")
        clipped = int(np.count_nonzero(np.abs(flat) > self.clip_range))
        q = np.rint(np.clip(flat, -self.clip_range, self.clip_range) / self.step)
        loss_q = round(min(max(float(loss), 0.0), LOSS_RANGE) / LOSS_RANGE * self.levels) \
            if math.isfinite(loss) else 0
        signed = np.concatenate([q.astype(np.int64) * weight,
                                 np.array([loss_q * weight, clipped, weight], dtype=np.int64)])
        return signed.astype(np.uint64).astype(self.dtype)  # two's complement, mod 2^R

    def decode(self, total: np.ndarray, contributors: int) -> tuple[np.ndarray, float, float, int]:
        """``(weighted mean values, mean loss, summed weight, clipped count)`` of a ring sum.

        Raises:
            FieldError: the sum is not one ``contributors`` honest clients could make: a
                weight sum outside ``[contributors, contributors x max_weight]``, a
                clipped count above the coordinates sent, or a value beyond
                ``weight sum x L`` (a client sent values outside the field range).

        """
        signed = total.astype(self.dtype).view(np.int32 if self.ring_bits == 32 else np.int64)
        signed = signed.astype(np.int64)
        weight, clipped, loss_q = int(signed[-1]), int(signed[-2]), int(signed[-3])
        values = signed[:-TAIL]
        if not contributors <= weight <= contributors * self.max_weight:
            raise FieldError(f"summed weight {weight} is outside [{contributors}, "
                             f"{contributors * self.max_weight}] for {contributors} clients")
        if not 0 <= clipped <= contributors * values.size:
            raise FieldError(f"summed clipped count {clipped} is impossible")
        bound = weight * self.levels
        if values.size and int(np.abs(values).max()) > bound or not 0 <= loss_q <= bound:
            raise FieldError(f"a summed value exceeds weight x levels ({bound}): a client "
                             "sent values outside the field range")
        mean = values.astype(np.float64) * (self.step / weight)
        return mean, loss_q * LOSS_RANGE / self.levels / weight, float(weight), clipped
