"""FeDeRA: LoRA initialised from the SVD of the pretrained weights, then FedIT."""

import numpy as np
import pytest
import torch

from strategies import ClientUpdate, RoundStats
from strategies.adapter import LoraAdapter
from strategies.federa import FeDeRA, svd_factors
from strategies.fedit import fedit_aggregate
from strategies.sparse import dense_key
from task.runtime import TaskRuntime
from task.settings import TaskSettings
from tests.conftest import random_adapter, tiny_run_config


def test_svd_factors_are_the_best_rank_r_approximation():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((7, 5))
    factors = svd_factors(weight, 2, scale=0.5)
    U, S, Vt = np.linalg.svd(weight)
    np.testing.assert_allclose(0.5 * factors.B @ factors.A, (U[:, :2] * S[:2]) @ Vt[:2],
                               rtol=1e-5, atol=1e-5)
    # the singular values are split evenly: both factors carry sqrt(S / s)
    np.testing.assert_allclose(np.linalg.norm(factors.A, axis=1),
                               np.linalg.norm(factors.B, axis=0), rtol=1e-5)
    wide = svd_factors(weight, 9, scale=1.0)  # rank above min(out, in): zero padded
    assert wide.A.shape == (9, 5) and not wide.A[5:].any() and not wide.B[:, 5:].any()
    np.testing.assert_allclose(wide.B @ wide.A, weight, atol=1e-5)


def test_the_initial_model_computes_what_the_pretrained_one_does():
    rng = np.random.default_rng(1)
    fresh = random_adapter(rng, {"m": 2}, head=False)
    weight = rng.standard_normal((5, 6)).astype(np.float32)
    calls = []
    initial = FeDeRA(lora_alpha=8.0).initial_global(
        fresh, lambda: calls.append(1) or {"m": weight})
    f = initial.modules["m"]
    effective = initial.extras[dense_key("m")] + initial.scale("m") * (f.B @ f.A)
    np.testing.assert_allclose(effective, 0.0, atol=1e-5)  # residual + s B A = W - W... = 0
    assert calls == [1]


def test_it_federates_like_fedit_and_keeps_the_residual():
    rng = np.random.default_rng(2)
    g = FeDeRA(lora_alpha=8.0).initial_global(random_adapter(rng, {"m": 2}),
                                              lambda: {"m": rng.standard_normal((5, 6))})
    updates = [LoraAdapter.from_state_dict(
        {**g.to_state_dict(), **random_adapter(rng, {"m": 2}).to_state_dict()}, 8.0)
        for _ in range(3)]
    strategy = FeDeRA(lora_alpha=8.0)
    strategy.history[1] = RoundStats(round=1)
    aggregation = strategy.start_aggregation(1, g)
    for node, u in enumerate(updates):
        aggregation.add(ClientUpdate(
            node_id=node, num_examples=node + 1, state=u.to_state_dict(), metrics={},
            adapter=u))
    new = aggregation.result()
    fedit = fedit_aggregate(updates, [1, 2, 3])
    np.testing.assert_allclose(new.modules["m"].A, fedit.modules["m"].A, rtol=1e-6)
    np.testing.assert_array_equal(new.extras[dense_key("m")], g.extras[dense_key("m")])
    assert strategy.history[1].metrics["base-delta-bytes"] == 5 * 6 * 4


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])  # GPT-2 stores W as in x out
def test_on_a_real_model_the_initial_logits_are_the_pretrained_ones(toy_csv, model):
    task = "classification" if model == "tiny-bert" else "causal-lm"
    extra = {"task": task, "target-modules": "auto"}
    if task == "causal-lm":
        extra["text-column"] = "body"
    rt = TaskRuntime.build(TaskSettings.from_run_config(tiny_run_config(model, toy_csv, **extra)))
    batch = rt.tokenizer(["a short text for the model", "another one"], return_tensors="pt",
                         padding=True)
    rt.model.eval()  # no dropout
    with torch.no_grad():
        rt.set_adapter(rt.initial_adapter)  # B = 0: the pretrained function
        before = rt.model(**batch).logits
        initial = FeDeRA(lora_alpha=8.0).initial_global(rt.initial_adapter, rt.base_weights)
        rt.set_adapter(initial)
        assert any(f.B.any() for f in initial.modules.values())
        after = rt.model(**batch).logits
        rt.set_adapter(LoraAdapter(initial.modules, initial.alpha,
                                   {k: v for k, v in initial.extras.items()
                                    if not k.endswith(".base_delta")}))
        without_residual = rt.model(**batch).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert (without_residual - before).abs().max() > 1e-2  # the residual is what cancels it
