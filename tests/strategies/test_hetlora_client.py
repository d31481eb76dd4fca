import numpy as np
import torch

from client.ranks import apply_rank_budget, fit_rank
from strategies.adapter import LoraAdapter, LoraFactors
from strategies.hetlora import HetLoRA, lora_factor_pairs, self_pruning_penalty
from strategies.instructions import ClientInstructions
from strategies.registry import get_strategy_class
from task.model import attach_lora, load_base_model
from task.settings import LoraSettings, ModelSettings


def _model(rank=4):
    base = load_base_model(ModelSettings(model="tiny-bert"), num_labels=3)
    return attach_lora(base, LoraSettings(lora_rank=rank), "classification", seed=0)


def test_penalty_value_and_gradient_match_the_formula():
    model = _model(rank=4)
    pairs = lora_factor_pairs(model, "default")
    assert len(pairs) == 4  # 2 layers x (query, value)
    with torch.no_grad():
        for _, b in pairs:
            b.normal_()  # B starts at zero; give the tail something to measure
    penalty = self_pruning_penalty(model, "default", gamma=0.5)  # tail = ranks 2 and 3
    expected = sum(float(a[2:].norm() * b[:, 2:].norm()) for a, b in pairs)
    assert np.isclose(float(penalty), expected, rtol=1e-6)
    penalty.backward()
    a, b = pairs[0]
    # d/dA_tail ||A_tail|| ||B_tail|| = ||B_tail|| A_tail / ||A_tail||; head of A untouched
    expected_grad = b[:, 2:].norm() * a[2:] / a[2:].norm()
    torch.testing.assert_close(a.grad[2:], expected_grad.detach())
    assert torch.count_nonzero(a.grad[:2]) == 0


def _instructions(**options):
    return ClientInstructions(server_round=1, strategy="hetlora", rank=4, alpha=8.0,
                              options=options)


def _adapter(tail_scale):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 6)).astype(np.float32)
    B = rng.standard_normal((5, 4)).astype(np.float32)
    A[3] *= tail_scale
    B[:, 3] *= tail_scale
    return LoraAdapter({"m": LoraFactors(A, B)}, alpha=8.0)


def test_rank_reduction_rule_is_hetloras_client_hook():
    options = {"hetlora-lambda": 0.01, "hetlora-gamma": 0.75, "hetlora-threshold": 0.05}
    prune = HetLoRA.client_hooks.after_training
    small_tail = prune(_adapter(1e-3), _instructions(**options))
    assert small_tail.max_rank == 3 and small_tail.alpha == 6.0  # scale 2 kept
    big_tail = prune(_adapter(1.0), _instructions(**options))
    assert big_tail.max_rank == 4
    fedit = get_strategy_class("fedit").client_hooks  # not HetLoRA: no pruning
    assert fedit.after_training(_adapter(1e-3), _instructions(**options)).max_rank == 4


def test_the_penalty_hook_reads_hetloras_settings_with_their_defaults():
    class Local:
        model = _model(rank=4)
        active = "default"

    assert HetLoRA.client_hooks.penalty(Local, _instructions(**{"hetlora-lambda": 0.0})) is None
    penalty = HetLoRA.client_hooks.penalty(Local, _instructions())  # the config's defaults
    with torch.no_grad():
        for _, b in lora_factor_pairs(Local.model, "default"):
            b.normal_()
    expected = 1e-3 * float(self_pruning_penalty(Local.model, "default", 0.99))
    assert expected > 0 and np.isclose(float(penalty()), expected, rtol=1e-6)


def test_node_rank_budget_lowers_rank_and_keeps_scale():
    ins = _instructions()
    lowered = apply_rank_budget(ins, {"max-lora-rank": 2})
    assert (lowered.rank, lowered.alpha) == (2, 4.0)
    assert apply_rank_budget(ins, {"max-lora-rank": 16}) is ins
    state = {"m.lora_A.weight": np.ones((4, 6)), "m.lora_B.weight": np.ones((5, 4))}
    fitted = fit_rank(state, 2)
    assert fitted["m.lora_A.weight"].shape == (2, 6) and fitted["m.lora_B.weight"].shape == (5, 2)
