"""DP-SGD local training with Opacus, tested by comparison with the non-DP path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from privacy.accounting import DPSettings, PrivacyLedger, noise_for_target
from task.dp_training import (
    PrivacyBudgetExceeded,
    SecureModeUnavailable,
    UnsupportedLayerError,
    budget_allows,
    check_dp_compatible,
    dp_data_loader,
    dp_loss,
    dp_sample_rate,
    dp_step,
    per_sample_grads,
    plan_round,
    private_training,
    secure_rng_available,
    train_local_dp,
)
from task.model import attach_lora
from task.runtime import TaskRuntime
from task.settings import LoraSettings, TaskSettings, TrainSettings
from task.training import Encoded, evaluate, make_batch, train_local
from tests.conftest import tiny_run_config

NO_DP = {"noise_multiplier": 0.0, "max_grad_norm": 1e9}


@pytest.fixture(scope="module")
def runtime(tiny_bert_dir, toy_csv) -> TaskRuntime:
    """One runtime for the module, reused like a client's cached runtime."""
    settings = TaskSettings.from_run_config(tiny_run_config(tiny_bert_dir, toy_csv))
    return TaskRuntime.build(settings)


@pytest.fixture
def rt(runtime):
    """The module's runtime with its trainable parameters back at their initial values."""
    snapshot = _trainable(runtime.model)
    yield runtime
    _restore(runtime.model, snapshot)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, snapshot) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in snapshot:
                param.copy_(snapshot[name])


def _steps(rt, **changes) -> TrainSettings:
    return dataclasses.replace(rt.settings.train, **changes)


def _small(data: Encoded, n: int) -> Encoded:
    return Encoded(input_ids=data.input_ids[:n], labels=data.labels[:n])


def _opacus_traces(model) -> list[str]:
    found = [f"{n}.{a}" for n, p in model.named_parameters()
             for a in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")
             if hasattr(p, a)]
    found += [f"{n}.{a}" for n, m in model.named_modules()
              for a in ("activations", "max_batch_len", "autograd_grad_sample_hooks")
              if a in m.__dict__]
    found += [f"{n} hooks" for n, m in model.named_modules()
              if m._forward_hooks or m._backward_hooks]
    return found


def _tiny_lora_model(kind: str):
    """A tiny LoRA model without dropout (r=4 on the attention projections), B random."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    torch.manual_seed(0)
    if kind == "bert":
        base = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, initializer_range=0.2))
        lora = LoraSettings(lora_rank=4, lora_alpha=8.0, target_modules="query,value")
        model = attach_lora(base, lora, "classification", seed=0)
    else:
        base = GPT2LMHeadModel(GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, bos_token_id=0,
            eos_token_id=0))
        lora = LoraSettings(lora_rank=4, lora_alpha=8.0, target_modules="c_attn")
        model = attach_lora(base, lora, "causal-lm", seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)  # with B = 0 the gradients of A would be 0
    return model


def _tiny_batch(kind: str) -> dict[str, torch.Tensor]:
    """Four examples of different lengths, right-padded."""
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 5, 7, 3]
    ids = torch.randint(1, 100, (4, 9), generator=gen)
    mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_opacus_per_sample_grads_equal_one_example_at_a_time(kind):
    model = _tiny_lora_model(kind)
    batch = _tiny_batch(kind)
    task = "classification" if kind == "bert" else "causal-lm"
    opacus = per_sample_grads(model, batch, task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(opacus) == trainable
    assert any("lora_A" in n for n in opacus) and any("lora_B" in n for n in opacus)
    assert _opacus_traces(model) == []
    for i in range(4):
        model.zero_grad(set_to_none=True)
        dp_loss(model, {k: v[i:i + 1] for k, v in batch.items()}, task).backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert param.grad.abs().max() > 0, name
                torch.testing.assert_close(opacus[name][i], param.grad, atol=1e-5, rtol=1e-5,
                                           msg=f"{name}, example {i}")


@pytest.mark.parametrize("grad_accumulation", [1, 2])
def test_no_noise_and_no_clipping_equals_plain_training(rt, grad_accumulation):
    data = rt.encoded_partition(0, 1)
    assert len(data) % (8 * grad_accumulation) == 0  # full batches, as Opacus averages them
    settings = _steps(rt, local_steps=3, batch_size=8, grad_accumulation=grad_accumulation)
    start = _trainable(rt.model)
    torch.manual_seed(7)  # dropout
    plain = train_local(rt.model, rt.tokenizer, data, settings, device=rt.device, seed=3)
    expected = _trainable(rt.model)
    results = {}
    for noise in (0.0, 1.0):
        _restore(rt.model, start)
        torch.manual_seed(7)
        dp = DPSettings(noise_multiplier=noise, max_grad_norm=1e9)
        results[noise] = train_local_dp(rt.model, rt.tokenizer, data, settings, dp=dp,
                                        ledger=PrivacyLedger(), device=rt.device, seed=3,
                                        poisson=False)
        got = _trainable(rt.model)
        if noise == 0.0:
            for name, value in expected.items():
                torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert max((got[n] - v).abs().max() for n, v in expected.items()) > 1e-3
    same = results[0.0]
    assert (same.loss_first, same.loss_mean, same.loss_last) == pytest.approx(
        (plain.loss_first, plain.loss_mean, plain.loss_last), abs=1e-5)
    assert same.steps == plain.steps == 3


def test_empty_poisson_batches_are_noise_only_steps_and_accounted(rt):
    data = _small(rt.encoded_partition(0, 1), 6)
    settings = _steps(rt, local_steps=12, batch_size=1)  # q = 1/6: P(empty) = (5/6)^6 = 0.33
    ledger = PrivacyLedger()
    start = _trainable(rt.model)
    result = train_local_dp(rt.model, rt.tokenizer, data, settings, ledger=ledger,
                            dp=DPSettings(noise_multiplier=1.0), device=rt.device, seed=0)
    assert result.empty_steps > 0
    assert result.steps == ledger.steps == 12
    assert ledger.history == [(1.0, pytest.approx(1 / 6), 12)]
    assert result.epsilon == ledger.epsilon(1e-5)
    assert any(not torch.equal(p, start[n]) for n, p in _trainable(rt.model).items())


def test_empty_first_batch_makes_an_accounted_noise_only_step(rt):
    # Before any non-empty batch Opacus' collate returns a list of empty tensors
    data = rt.encoded_partition(0, 1)
    settings = _steps(rt, batch_size=8)
    params = [p for p in rt.model.parameters() if p.requires_grad]
    start = _trainable(rt.model)
    optimizer = torch.optim.AdamW(params, lr=0.01)
    loader = dp_data_loader(data, rt.tokenizer, settings, seed=0)
    with private_training(rt.model, optimizer, loader, dp=DPSettings(noise_multiplier=1.0),
                          noise_multiplier=1.0) as private:
        empty_list = [torch.zeros((0,), dtype=torch.long)]
        empty_dict = {"input_ids": torch.zeros((0, 5), dtype=torch.long),
                      "attention_mask": torch.zeros((0, 5), dtype=torch.long),
                      "labels": torch.zeros((0,), dtype=torch.long)}
        for batch in (empty_list, empty_dict):
            assert dp_step(rt.model, private.optimizer, batch, physical_batch_size=8,
                           device=rt.device) == (None, 0)
        history = private.accountant.history
    assert history == [(1.0, pytest.approx(8 / len(data)), 2)]
    assert any(not torch.equal(p, start[n]) for n, p in _trainable(rt.model).items())
    assert _opacus_traces(rt.model) == []


def test_reused_model_attaches_again_and_is_unchanged_for_plain_use(rt):
    data = rt.encoded_partition(0, 1)
    batch = make_batch(data, list(range(16)), rt.tokenizer, rt.device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    baseline_hooks = _opacus_traces(rt.model)
    start = _trainable(rt.model)
    rt.model.eval()
    with torch.no_grad():
        before = rt.model(**inputs).logits
    torch.manual_seed(5)
    plain = train_local(rt.model, rt.tokenizer, data, _steps(rt, local_steps=2),
                        device=rt.device, seed=1)
    plain_params = _trainable(rt.model)
    _restore(rt.model, start)
    ledger = PrivacyLedger()
    dp = DPSettings(noise_multiplier=1.0)
    for round_seed in (1, 2):  # the second round attaches Opacus to the same model again
        train_local_dp(rt.model, rt.tokenizer, data, _steps(rt, local_steps=2), dp=dp,
                       ledger=ledger, device=rt.device, seed=round_seed)
        assert _opacus_traces(rt.model) == baseline_hooks == []
    assert ledger.steps == 4
    _restore(rt.model, start)
    rt.model.eval()
    with torch.no_grad():
        assert torch.equal(rt.model(**inputs).logits, before)
    torch.manual_seed(5)
    again = train_local(rt.model, rt.tokenizer, data, _steps(rt, local_steps=2),
                        device=rt.device, seed=1)
    assert again.loss_last == plain.loss_last
    for name, value in plain_params.items():
        assert torch.equal(_trainable(rt.model)[name], value), name


def test_leftovers_of_an_interrupted_round_are_removed(rt):
    from opacus.grad_sample import GradSampleHooks

    rt.model.train()
    GradSampleHooks(rt.model)  # attached, never cleaned up: as after a crash mid-round
    data = rt.encoded_partition(0, 1)
    batch = make_batch(data, [0, 1, 2], rt.tokenizer, rt.device)
    dp_loss(rt.model, batch, data.task)  # activations left behind by a forward without backward
    assert _opacus_traces(rt.model)
    ledger = PrivacyLedger()
    train_local_dp(rt.model, rt.tokenizer, data, _steps(rt, local_steps=1),
                   dp=DPSettings(noise_multiplier=1.0), ledger=ledger, device=rt.device)
    assert ledger.steps == 1 and _opacus_traces(rt.model) == []


def test_unsupported_layer_is_named(rt):
    pooler = rt.model.base_model.model.bert.pooler
    pooler.add_module("norm", torch.nn.BatchNorm1d(32))  # trainable, with running stats
    try:
        with pytest.raises(UnsupportedLayerError,
                           match=r"layer 'base_model.model.bert.pooler.norm' \(BatchNorm1d\)"):
            check_dp_compatible(rt.model)
        with pytest.raises(UnsupportedLayerError, match="GroupNorm"):
            train_local_dp(rt.model, rt.tokenizer, rt.encoded_partition(0, 1), rt.settings.train,
                           dp=DPSettings(noise_multiplier=1.0), ledger=PrivacyLedger(),
                           device=rt.device)
        assert _opacus_traces(rt.model) == []
    finally:
        del pooler.norm


def test_budget_refusal(rt):
    data = rt.encoded_partition(0, 1)
    settings = _steps(rt, local_steps=20)
    ledger = PrivacyLedger()
    rate = dp_sample_rate(len(data), settings)
    ledger.record(noise_multiplier=1.0, sample_rate=rate, steps=200)
    spent = ledger.epsilon(1e-5)
    planned = ledger.epsilon_after(noise_multiplier=1.0, sample_rate=rate, steps=20, delta=1e-5)
    budget = round((spent + planned) / 2, 3)  # room for a step or two, not for 20
    dp = DPSettings(noise_multiplier=1.0, epsilon_budget=budget)
    allowed, after = budget_allows(ledger, dp, planned_steps=20, sample_rate=rate, noise=1.0)
    assert after == planned > budget and not allowed
    assert budget_allows(ledger, dp, planned_steps=1, sample_rate=rate, noise=1.0)[0]
    start = _trainable(rt.model)
    with pytest.raises(PrivacyBudgetExceeded, match=f"past epsilon-budget {budget:g}"):
        train_local_dp(rt.model, rt.tokenizer, data, settings, dp=dp, ledger=ledger,
                       device=rt.device)
    assert ledger.steps == 200 and ledger.epsilon(dp.delta) == spent
    assert all(torch.equal(p, start[n]) for n, p in _trainable(rt.model).items())


def test_target_epsilon_sets_the_noise(rt):
    data = rt.encoded_partition(0, 1)
    settings = _steps(rt, local_steps=4)
    dp = DPSettings(target_epsilon=5.0, delta=1e-5)
    ledger = PrivacyLedger()
    result = train_local_dp(rt.model, rt.tokenizer, data, settings, dp=dp, ledger=ledger,
                            device=rt.device)
    rate = dp_sample_rate(len(data), settings)
    assert result.noise_multiplier == noise_for_target(target_epsilon=5.0, delta=1e-5,
                                                       sample_rate=rate, steps=4)
    assert 5.0 - 0.05 <= result.epsilon <= 5.0
    run = plan_round(len(data), settings, dp=dp, target_steps=40)  # the target over 10 rounds
    assert run.noise_multiplier > result.noise_multiplier


def test_sample_rate_and_expected_batch_size(rt):
    settings = TrainSettings(batch_size=16, local_steps=5)
    assert dp_sample_rate(1000, settings) == 1 / 63  # Opacus: 1 / len(loader)
    assert dp_sample_rate(10, settings) == 1.0
    assert plan_round(1000, settings, dp=DPSettings(noise_multiplier=1.0)).expected_batch_size \
        == pytest.approx(1000 / 63)
    # 196 examples in batches of 4: Opacus' int(196 * (1 / 49)) would average over 3
    data = rt.encoded_partition(0, 1)
    data = Encoded(input_ids=(data.input_ids * 2)[:196], labels=(data.labels * 2)[:196])
    settings = _steps(rt, batch_size=4)
    params = [p for p in rt.model.parameters() if p.requires_grad]
    loader = dp_data_loader(data, rt.tokenizer, settings, seed=0)
    with private_training(rt.model, torch.optim.AdamW(params), loader,
                          dp=DPSettings(noise_multiplier=1.0), noise_multiplier=1.0) as private:
        assert private.optimizer.expected_batch_size == pytest.approx(4.0)
        assert private.sample_rate == dp_sample_rate(196, settings) == 1 / 49


def test_clear_errors_before_training(rt):
    data = rt.encoded_partition(0, 1)
    small = _small(data, 6)
    with pytest.raises(ValueError, match=r"delta 0.2 must be below 1/n = 0.167"):
        train_local_dp(rt.model, rt.tokenizer, small, rt.settings.train,
                       dp=DPSettings(noise_multiplier=1.0, delta=0.2), ledger=PrivacyLedger(),
                       device=rt.device)
    with pytest.raises(ValueError, match="ledger uses accountant 'prv'"):
        train_local_dp(rt.model, rt.tokenizer, data, rt.settings.train,
                       dp=DPSettings(noise_multiplier=1.0), ledger=PrivacyLedger("prv"),
                       device=rt.device)
    with pytest.raises(TypeError):
        train_local_dp(rt.model, rt.tokenizer, data, rt.settings.train,  # type: ignore[misc]
                       DPSettings(noise_multiplier=1.0), PrivacyLedger(), rt.device)


@pytest.mark.skipif(secure_rng_available(), reason="torchcsprng is installed")
def test_secure_mode_without_torchcsprng_is_refused(rt):
    start = _trainable(rt.model)
    with pytest.raises(SecureModeUnavailable, match="torchcsprng"):
        train_local_dp(rt.model, rt.tokenizer, rt.encoded_partition(0, 1), rt.settings.train,
                       dp=DPSettings(noise_multiplier=1.0, secure_mode=True),
                       ledger=PrivacyLedger(), device=rt.device)
    assert _opacus_traces(rt.model) == []
    assert all(torch.equal(p, start[n]) for n, p in _trainable(rt.model).items())


def test_dp_training_lowers_the_loss(rt):
    # dropout draws from torch's global generator: seed it, or the result depends on what
    # the tests before this one drew (over dropout seeds 0-5 the loss fell by 0.045-0.22)
    torch.manual_seed(0)
    data = rt.encoded_partition(0, 1)
    before = evaluate(rt.model, rt.tokenizer, data, batch_size=64, device=rt.device)
    settings = _steps(rt, local_steps=30, learning_rate=0.01)
    ledger = PrivacyLedger()
    result = train_local_dp(rt.model, rt.tokenizer, data, settings, ledger=ledger,
                            dp=DPSettings(noise_multiplier=0.3, max_grad_norm=1.0),
                            device=rt.device, seed=0)
    after = evaluate(rt.model, rt.tokenizer, data, batch_size=64, device=rt.device)
    assert after["loss"] < before["loss"] - 0.05
    assert after["accuracy"] > before["accuracy"]
    assert result.steps == ledger.steps == 30
    assert 0 < result.epsilon == ledger.epsilon(1e-5) < float("inf")
    assert result.metrics()["dp-epsilon"] == result.epsilon


def test_noise_and_sampling_come_from_os_entropy_unless_seeded(rt):
    # The attacker (the server) knows every seed in the run config; without a seed of its
    # own the round's noise and Poisson sample must not be reproducible from the settings.
    data = rt.encoded_partition(0, 1)
    settings = _steps(rt, local_steps=2)
    dp = DPSettings(noise_multiplier=1.0)
    start = _trainable(rt.model)

    def run(**seed):
        _restore(rt.model, start)
        torch.manual_seed(7)  # dropout and anything else on torch's global stream: identical
        train_local_dp(rt.model, rt.tokenizer, data, settings, dp=dp, ledger=PrivacyLedger(),
                       device=rt.device, **seed)
        return _trainable(rt.model)

    first, second = run(), run()
    assert any(not torch.equal(first[n], second[n]) for n in first)
    seeded, again = run(seed=11), run(seed=11)
    assert all(torch.equal(seeded[n], again[n]) for n in seeded)

    def sample(**seed):
        loader = dp_data_loader(data, rt.tokenizer, settings, **seed)
        generator = loader.generator
        return torch.randint(0, 2**30, (8,), generator=generator).tolist()

    assert sample() != sample()
    assert sample(seed=3) == sample(seed=3)
