import numpy as np
import pytest

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.slora import SLoRAConfig, lora_from_update, stage_two_adapter
from strategies.sparse import densify, mask_size, sparse_indices, sparse_key


def test_mask_is_seeded_by_run_and_module():
    a = sparse_indices("m.q", 100, 10, seed=0)
    assert np.array_equal(a, sparse_indices("m.q", 100, 10, seed=0))
    assert not np.array_equal(a, sparse_indices("m.v", 100, 10, seed=0))
    assert not np.array_equal(a, sparse_indices("m.q", 100, 10, seed=1))
    assert len(np.unique(a)) == 10 and np.all(np.diff(a) > 0)


def test_density_bounds():
    assert mask_size((10, 10), 0.05) == 5
    assert mask_size((10, 10), 1.0) == 100
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"slora-density must be in \(0, 1\]"):
            mask_size((10, 10), bad)


def _global(rank, out_f=6, in_f=5, density=0.5, seed=0):
    rng = np.random.default_rng(seed)
    factors = LoraFactors(A=rng.standard_normal((rank, in_f)).astype(np.float32),
                          B=np.zeros((out_f, rank), np.float32))
    k = mask_size((out_f, in_f), density)
    delta = rng.standard_normal(k).astype(np.float32)
    return LoraAdapter({"m": factors}, alpha=2.0 * rank,
                       extras={sparse_key("m"): delta, "head": np.ones(3, np.float32)})


def test_stage_two_init_is_the_truncated_svd_of_the_stage_one_update():
    g = _global(rank=2)
    out = stage_two_adapter(g, seed=7)
    dense = densify(g.extras[sparse_key("m")], "m", (6, 5), seed=7)
    U, S, Vt = np.linalg.svd(dense)
    expected = (U[:, :2] * S[:2]) @ Vt[:2]
    np.testing.assert_allclose(out.modules["m"].delta(out.alpha), expected, atol=1e-5)
    assert set(out.extras) == {"head"}  # deltas dropped, head kept


def test_full_rank_init_reproduces_the_whole_update():
    g = _global(rank=5)  # min(6, 5) = 5: full rank
    out = stage_two_adapter(g, seed=3)
    dense = densify(g.extras[sparse_key("m")], "m", (6, 5), seed=3)
    np.testing.assert_allclose(out.modules["m"].delta(out.alpha), dense, atol=1e-5)


def test_sparse_svd_path_matches_dense():
    rng = np.random.default_rng(0)
    delta = np.zeros((60, 40))
    delta.flat[rng.choice(2400, 120, replace=False)] = rng.standard_normal(120)
    dense = lora_from_update(delta, 4, scale=2.0)
    import strategies.slora as slora

    limit, slora.DENSE_SVD_LIMIT = slora.DENSE_SVD_LIMIT, 0
    try:
        sparse = lora_from_update(delta, 4, scale=2.0)
    finally:
        slora.DENSE_SVD_LIMIT = limit
    np.testing.assert_allclose(sparse.B @ sparse.A, dense.B @ dense.A, atol=1e-5)


def test_bad_settings():
    with pytest.raises(ValueError, match="slora-density"):
        SLoRAConfig(slora_density=2.0)
    with pytest.raises(ValueError, match="slora-then must be one of"):
        SLoRAConfig(slora_then="hetlora")
    with pytest.raises(ValueError, match="must be below num-rounds"):
        SLoRAConfig(slora_rounds=3).check_run(num_rounds=3, lora_rank=8)
