"""Fixed-point encoding, the ring's width, the primitives, and the settings' refusals."""

import numpy as np
import pytest

from privacy.secagg_config import SecureAggregationConfig
from privacy.secagg_crypto import (
    KeyPair,
    ShareError,
    combine_shares,
    decrypt,
    encrypt,
    expand_mask,
    share_aad,
    split_secret,
)
from privacy.secagg_field import LOSS_RANGE, FieldError, FieldSpec
from strategies.config import ConfigError
from task.run_settings import RunSettings


def test_rounding_error_is_half_a_step_and_matches_the_documented_figure():
    spec = FieldSpec.for_clients(1.0, 16, 1024, 4)
    assert spec.step == 1 / 32767 and spec.rounding_error() == pytest.approx(1.526e-5, rel=1e-3)
    assert SecureAggregationConfig().rounding_error() == spec.rounding_error()
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, 1000) for _ in range(4)]
    weights = [3, 100, 1024, 7]
    total = sum(spec.encode(x, w, 0.5) for x, w in zip(xs, weights, strict=True))
    mean, loss, weight, clipped = spec.decode(total, 4)
    exact = np.average(xs, axis=0, weights=weights)
    assert np.abs(mean - exact).max() <= spec.rounding_error()
    assert weight == sum(weights) and clipped == 0
    assert loss == pytest.approx(0.5, abs=LOSS_RANGE / 32767)


def test_the_ring_widens_only_when_the_sum_could_wrap():
    assert FieldSpec.for_clients(1.0, 16, 1024, 64).ring_bits == 32  # 64 x 2^10 x (2^15-1)
    assert FieldSpec.for_clients(1.0, 16, 1024, 65).ring_bits == 64
    with pytest.raises(FieldError, match="overflow a 64-bit ring"):
        FieldSpec.for_clients(1.0, 48, 2**20, 1000)


def test_negative_values_wrap_and_come_back():
    spec = FieldSpec(2.0, 8, 10, 32)
    total = spec.encode(np.array([-2.0, -1.0, 0.0, 1.0]), 10, 1.0)
    assert total.dtype == np.uint32 and total[0] == 2**32 - 10 * 127
    mean, *_ = spec.decode(total, 1)
    np.testing.assert_allclose(mean, [-2.0, -1.0, 0.0, 1.0], atol=spec.rounding_error())


def test_a_sum_no_honest_clients_could_make_is_refused():
    spec = FieldSpec(1.0, 16, 100, 32)
    honest = spec.encode(np.zeros(3), 50, 1.0) + spec.encode(np.zeros(3), 60, 1.0)
    with pytest.raises(FieldError, match="summed weight"):
        spec.decode(honest, 1)  # 110 examples cannot come from one client capped at 100
    forged = honest.copy()
    forged[0] += np.uint32(2**30)  # a value far outside weight x levels
    with pytest.raises(FieldError, match="outside the field range"):
        spec.decode(forged, 2)
    with pytest.raises(FieldError, match="weight 101 outside"):
        spec.encode(np.zeros(3), 101, 1.0)


def test_shamir_shares_recover_with_threshold_and_not_below():
    secret = bytes(range(32))
    shares = split_secret(secret, 3, 5)
    assert combine_shares({1: shares[0], 4: shares[3], 5: shares[4]}, 3) == secret
    with pytest.raises(ShareError, match="2 share"):
        combine_shares({1: shares[0], 2: shares[1]}, 3)
    # two shares are consistent with every secret: combining them as if t were 2 is wrong
    assert combine_shares({1: shares[0], 2: shares[1]}, 2) != secret


def test_masks_are_full_width_deterministic_and_separated_by_label():
    a = expand_mask(b"s" * 16, 1000, np.uint64, "x")
    assert a.dtype == np.uint64 and np.array_equal(a, expand_mask(b"s" * 16, 1000, np.uint64, "x"))
    assert (a >> np.uint64(32)).max() > 2**31  # the high half is used: no 32-bit folding
    assert not np.array_equal(a[:10].view(np.uint32)[:10],
                              expand_mask(b"s" * 16, 10, np.uint32, "y"))


def test_pairwise_keys_agree_and_shares_bind_their_route():
    u, v = KeyPair(), KeyPair()
    assert u.agree(v.public_bytes, "k", 1, 2) == v.agree(u.public_bytes, "k", 2, 1)
    key = u.agree(v.public_bytes, "k", 1, 2)
    blob = encrypt(key, b"share", share_aad(1, 3, 1, 2))
    assert decrypt(key, blob, share_aad(1, 3, 1, 2)) == b"share"
    with pytest.raises(ShareError, match="does not authenticate"):
        decrypt(key, blob, share_aad(1, 4, 1, 2))  # replayed into another round


@pytest.mark.parametrize("extra, message", [
    ({"strategy": "flexlora"}, "not linear in the factors"),
    ({"strategy": "fedex-lora"}, "needs each client's product"),
    ({"strategy": "flora"}, "stacks every client's factors"),
    ({"strategy": "hetlora"}, "hetlora-weighting=sparsity"),
    ({"aggregator": "median"}, "aggregator=median needs every client's update"),
    ({"secagg-threshold": 1}, "one share would reveal"),
    ({"min-train-nodes": 1}, "the sum of one client is its update"),
])
def test_settings_refuse_what_secure_aggregation_cannot_do(extra, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config({"secure-aggregation": True, **extra})


def test_supported_strategies_parse():
    for strategy in ("fedit", "ffa-lora", "fedsa-lora", "slora", "federa"):
        settings = RunSettings.from_run_config({"secure-aggregation": True,
                                                "strategy": strategy})
        assert settings.secure.secure_aggregation
    RunSettings.from_run_config({"secure-aggregation": True, "strategy": "hetlora",
                                 "hetlora-weighting": "data-size"})
