"""The secure-aggregation settings (``secure-aggregation``, ``secagg-*``), parsed once."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.config import check, setting


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Whether the server sees only the sum of a round's updates, and how it is computed.

    See :mod:`privacy.secagg_protocol` for the protocol and :mod:`privacy.secagg_field`
    for the encoding (clip range, bits, weight cap, and the rounding error they give).
    """

    secure_aggregation: bool = setting(
        False, "SecAgg+: the server learns only the weighted sum of each round's updates")
    secagg_degree: int = setting(
        0, "neighbours each client masks with and shares its secrets among "
        "(0 = auto: 2 ceil(1.5 log2 n), at most n - 1)")
    secagg_threshold: int = setting(
        0, "shares that recover a dropped client's secret (0 = auto: a strict majority of "
        "its degree + 1 share holders); more than this many dropouts abort a round")
    secagg_clip_range: float = setting(
        1.0, "values are clipped to [-c, c] before quantization")
    secagg_bits: int = setting(
        16, "quantization levels 2^(bits-1) - 1 per sign; rounding error c / (2^bits - 2)")
    secagg_max_weight: int = setting(
        1024, "a client's weight (example count) is capped at this; it sizes the ring")

    def __post_init__(self) -> None:
        check(self.secagg_degree >= 0,
              f"secagg-degree must not be negative (0 = auto), got {self.secagg_degree}")
        check(self.secagg_threshold == 0 or self.secagg_threshold >= 2,
              f"secagg-threshold must be 0 (auto) or at least 2 (one share would reveal a "
              f"secret), got {self.secagg_threshold}")
        check(self.secagg_clip_range > 0,
              f"secagg-clip-range must be positive, got {self.secagg_clip_range}")
        check(2 <= self.secagg_bits <= 48,
              f"secagg-bits must be in 2..48, got {self.secagg_bits}")
        check(self.secagg_max_weight >= 1,
              f"secagg-max-weight must be at least 1, got {self.secagg_max_weight}")

    def rounding_error(self) -> float:
        """The largest rounding error of a mean coordinate: ``c / (2 (2^(b-1) - 1))``."""
        return self.secagg_clip_range / (2 * (2 ** (self.secagg_bits - 1) - 1))
