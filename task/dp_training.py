"""Local DP-SGD training with Opacus: per-example clipping, Gaussian noise, a privacy ledger.

Why one module of about 600 lines: Opacus's integration with PEFT models (the loss per
example, Poisson batches, the accountant and ledger, and the workarounds they need)
belongs together; each part depends on the others' invariants.

:func:`train_local_dp` is the DP counterpart of :func:`task.training.train_local`. It
trains only the parameters that require grad (the LoRA factors and the head): Opacus'
hooks are attached to the modules that own such parameters, so frozen base weights get
no per-sample gradients. Per round:

1. plan: steps as ``train_local`` counts them, the sample rate Opacus uses
   (:func:`dp_sample_rate`), the noise (given, or found for ``target_epsilon``);
2. refuse the round if it would take epsilon past ``epsilon_budget``;
3. attach Opacus (``PrivacyEngine.make_private`` with Poisson sampling, hooks mode, no
   model wrapper), train, and always detach, so the (cached, reused) model object comes
   back exactly as it was: no hooks, no ``grad_sample`` attributes, no activations;
4. record the steps Opacus' own accountant counted into the :class:`PrivacyLedger`.

Decisions:

- Sample rate: Opacus derives it from the data loader, ``1 / ceil(n / (B * ga))`` for a
  partition of n examples, batch size B and grad accumulation ga; that is ``B * ga / n``
  when B * ga divides n, and never above it. The expected batch size used to average the
  noisy sum is ``n * sample_rate`` (Opacus rounds it down, which over-weights the
  gradients when the product falls just below a whole number; it is set exactly here).
- Grad accumulation: one DP step is one logical Poisson batch of expected size B * ga,
  run in physical chunks of at most B examples (Opacus' skip-step mechanism).
- Empty Poisson batches (every example left out, which Poisson sampling allows) are not
  passed to the model (a BERT forward on zero rows fails); the step still happens as a
  noise-only step: zero per-sample gradients, Gaussian noise, optimizer update, and
  Opacus' accountant counts it.
- Randomness of the mechanism (the Gaussian noise and the Poisson sampling): by default
  (``seed=None``) each round's generators are seeded from OS entropy
  (:func:`secrets.randbits`), so whoever knows the run's settings (the server) cannot
  regenerate the noise and subtract it from the update, nor tell which examples a step
  sampled. A ``seed`` makes both reproducible, and the epsilon then holds only against
  parties that do not know the seed: pass one only for experiments. Secure mode
  (``DPSettings.secure_mode``) draws both from Opacus' cryptographically secure RNG
  instead, which also resists attacks on the floating-point sampler; without the
  ``torchcsprng`` package it raises :class:`SecureModeUnavailable` before anything is
  touched (no silent fallback).
- The causal-LM and instruction loss under DP is the mean over examples of each
  example's mean token loss (over its response tokens for instruction tuning; masked
  tokens count for nothing): per-example clipping needs a loss that is a mean over
  examples. ``train_local`` uses the token mean over the batch instead.
- The ledger is written only when the round completes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.grad_sample import AbstractGradSampleModule, GradSampleHooks
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch.utils.data import DataLoader, Dataset, Sampler

import privacy.opacus_import  # noqa: F401 - takes off the root log handler Opacus adds
from privacy.accounting import DPSettings, PrivacyLedger, noise_for_target
from task.settings import TrainSettings
from task.tasks.registry import as_task
from task.training import Encoded, TrainResult, make_batch, sample_batches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from task.tasks.base import Task

_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")
_PARAM_ATTRS = (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad")
_NOISE_STREAM, _SAMPLING_STREAM = 1, 2


class UnsupportedLayerError(ValueError):
    """A trainable layer that Opacus cannot compute private per-sample gradients for."""


class SecureModeUnavailable(RuntimeError):
    """Secure mode was asked for, but the secure RNG package is not installed."""


class PrivacyBudgetExceeded(RuntimeError):
    """The planned round would take epsilon past the budget."""


@dataclass(frozen=True)
class DPRoundPlan:
    """What a DP round will do: steps, Opacus' sample rate, noise, expected batch size."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    expected_batch_size: float


@dataclass
class DPTrainResult(TrainResult):
    """What one DP training round did, with its privacy parameters and the epsilon after it.

    ``epsilon`` is cumulative over the ledger (every recorded round), at ``delta``.
    Loss statistics are over the steps with a non-empty batch (NaN if there were none).
    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    delta: float
    epsilon: float
    accountant: str
    empty_steps: int
    examples_seen: int

    def metrics(self) -> dict[str, float]:
        """The privacy figures of the round, flat, for a Flower MetricRecord."""
        return {"dp-epsilon": self.epsilon, "dp-delta": self.delta,
                "dp-noise-multiplier": self.noise_multiplier, "dp-sample-rate": self.sample_rate,
                "dp-max-grad-norm": self.max_grad_norm, "dp-steps": float(self.steps),
                "dp-empty-steps": float(self.empty_steps)}


@dataclass
class PrivateTraining:
    """Opacus' objects while attached: the DP optimizer, the sampling loader, the accountant."""

    optimizer: DPOptimizer
    loader: DataLoader
    accountant: IAccountant
    sample_rate: float


def planned_steps(num_examples: int, settings: TrainSettings) -> int:
    """Optimizer steps of a round, counted as :func:`task.training.train_local` does."""
    per_epoch = math.ceil(num_examples / (settings.batch_size * settings.grad_accumulation))
    return settings.local_steps or settings.local_epochs * per_epoch


def dp_sample_rate(num_examples: int, settings: TrainSettings) -> float:
    """The Poisson sample rate Opacus uses: ``1 / ceil(n / (batch_size * grad_accumulation))``."""
    if num_examples <= 0:
        raise ValueError("cannot train on an empty partition")
    return 1.0 / math.ceil(num_examples / (settings.batch_size * settings.grad_accumulation))


def plan_round(
    num_examples: int, settings: TrainSettings, *, dp: DPSettings,
    target_steps: int | None = None,
) -> DPRoundPlan:
    """Steps, sample rate and noise of a round on a partition of ``num_examples``.

    Args:
        num_examples: size of the client's training partition.
        settings: the local training settings (steps or epochs, batch, accumulation).
        dp: the DP settings; with ``target_epsilon`` the noise is found for it.
        target_steps: the steps ``dp.target_epsilon`` is spread over (default: this
            round's); pass rounds x local steps to spend the target over a whole run.

    """
    steps = planned_steps(num_examples, settings)
    rate = dp_sample_rate(num_examples, settings)
    if dp.noise_multiplier is not None:
        noise = float(dp.noise_multiplier)
    else:
        assert dp.target_epsilon is not None  # DPSettings guarantees one of the two
        noise = noise_for_target(target_epsilon=dp.target_epsilon, delta=dp.delta,
                                 sample_rate=rate, steps=target_steps or steps,
                                 accountant=dp.accountant)
    return DPRoundPlan(steps=steps, sample_rate=rate, noise_multiplier=noise,
                       expected_batch_size=num_examples * rate)


def budget_allows(
    ledger: PrivacyLedger, dp: DPSettings, *, planned_steps: int, sample_rate: float,
    noise: float,
) -> tuple[bool, float]:
    """Whether a planned round keeps epsilon within ``dp.epsilon_budget``, and that epsilon.

    Returns:
        (allowed, epsilon after the round at ``dp.delta``); always allowed without a budget.

    """
    epsilon = ledger.epsilon_after(noise_multiplier=noise, sample_rate=sample_rate,
                                   steps=planned_steps, delta=dp.delta)
    return dp.epsilon_budget is None or epsilon <= dp.epsilon_budget, epsilon


def secure_rng_available() -> bool:
    """Whether ``torchcsprng`` (Opacus' secure RNG) can be imported."""
    return importlib.util.find_spec("torchcsprng") is not None


def check_secure_mode(dp: DPSettings) -> None:
    """Raise :class:`SecureModeUnavailable` if secure mode is asked for but cannot be had."""
    if dp.secure_mode and not secure_rng_available():
        raise SecureModeUnavailable(
            "secure-mode is on, but the torchcsprng package (the cryptographically secure "
            "RNG Opacus needs for noise and sampling) is not installed; install a torchcsprng "
            "built for your torch, or turn secure-mode off (experiments only)")


def check_dp_compatible(model: torch.nn.Module) -> None:
    """Check every trainable layer against Opacus' validators, naming any it cannot train.

    Raises:
        UnsupportedLayerError: a trainable layer is one Opacus refuses (e.g. BatchNorm) or
            keeps buffers; or nothing is trainable.

    """
    problems = []
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        reasons = [_first_sentence(e) for e in validator(module)] if validator else []
        if any(True for _ in module.buffers()):
            reasons.append("it keeps buffers, which Opacus cannot make private")
        if reasons:
            problems.append(f"layer '{name}' ({type(module).__name__}): {reasons[0]}")
    if problems:
        raise UnsupportedLayerError(
            "Opacus cannot train these layers with DP-SGD: " + "; ".join(problems)
            + ". Freeze them (requires_grad=False) or replace them (e.g. BatchNorm by "
            "GroupNorm or LayerNorm)")
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedLayerError("the model has no trainable parameters to train with DP")


def _first_sentence(error: Exception) -> str:
    text = str(error.args[0]) if error.args else str(error)
    return text.split(". ")[0].strip()


def detach_dp(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every trace of Opacus from a model, also after an interrupted round.

    Unwraps a ``GradSampleModule``, removes the hooks (the handles Opacus keeps on the
    model), and deletes the attributes Opacus puts on parameters (``grad_sample``,
    ``summed_grad``, ...) and on modules (stored activations). Returns the plain model.
    """
    if isinstance(model, AbstractGradSampleModule):
        model = model.to_standard_module()
    handles = model.__dict__.pop("autograd_grad_sample_hooks", None) or []
    while handles:
        handles.pop().remove()
    for param in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(param, attr):
                delattr(param, attr)
    for module in model.modules():
        for attr in _MODULE_ATTRS:
            module.__dict__.pop(attr, None)
    return model


def dp_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
            task: Task | str) -> torch.Tensor:
    """Mean over examples of each example's loss (what per-example clipping needs).

    Each example's loss is ``task``'s (:meth:`~task.tasks.base.Task.example_losses`):
    cross-entropy of its label for classification; for causal LM and instruction tuning
    the mean next-token loss over its own counted tokens (all tokens, or the response's),
    so every example weighs the same whatever its length.
    """
    return as_task(task).example_losses(model, dict(batch)).mean()


def per_sample_grads(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], task: Task | str,
) -> dict[str, torch.Tensor]:
    """Opacus' per-example gradients of :func:`dp_loss` for every trainable parameter.

    Attaches Opacus' hooks (no wrapper), runs one forward and backward pass in training
    mode, and detaches again. Each tensor has the example as its first dimension: the
    gradient of that example's own loss. For verifying Opacus on a model (tests).
    """
    was_training = model.training
    detach_dp(model)
    model.train()
    try:
        GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
        _backward(dp_loss(model, batch, task))
        return {name: p.grad_sample.detach().clone()  # type: ignore[attr-defined]
                for name, p in model.named_parameters() if p.requires_grad}
    finally:
        detach_dp(model)
        for param in model.parameters():
            param.grad = None
        model.train(was_training)


class _Indices(Dataset):
    """Examples as their indices (a 1-tuple each: Opacus inspects ``dataset[0]``)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int]:
        return (index,)


class _PadCollate:
    """Pads the sampled examples into model inputs with labels, on the CPU."""

    def __init__(self, data: Encoded, tokenizer: PreTrainedTokenizerBase) -> None:
        self.data = data
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[int]]) -> dict[str, torch.Tensor]:
        indices = [int(item[0]) for item in items]
        return make_batch(self.data, indices, self.tokenizer, torch.device("cpu"))


class _ShuffledBatches(Sampler[list[int]]):
    """Logical batches exactly as ``train_local`` draws them (``grad_accumulation`` chunks)."""

    def __init__(self, size: int, settings: TrainSettings, generator: torch.Generator) -> None:
        self._chunks = sample_batches(size, settings.batch_size, generator)
        self._accumulation = settings.grad_accumulation
        self._per_epoch = math.ceil(size / (settings.batch_size * settings.grad_accumulation))

    def __len__(self) -> int:
        return self._per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self._per_epoch):
            yield [i for _ in range(self._accumulation) for i in next(self._chunks)]


def _stream_seed(seed: int | None, stream: int) -> int:
    """A seed for one random stream (noise, sampling): from the round's seed, or OS entropy.

    With ``seed=None`` every call draws 63 fresh bits from the OS (:mod:`secrets`), so
    nothing anyone else knows determines the stream.
    """
    if seed is None:
        return secrets.randbits(63)
    state = np.random.SeedSequence([seed % 2**63, stream]).generate_state(1, np.uint64)
    return int(state[0] % 2**63)


def dp_data_loader(
    data: Encoded, tokenizer: PreTrainedTokenizerBase, settings: TrainSettings, *,
    seed: int | None = None, poisson: bool = True,
) -> DataLoader:
    """The loader to hand to Opacus: indices of the partition, padded by the collate.

    With ``poisson`` Opacus replaces its sampler by Poisson sampling at
    ``1 / len(loader)``; without, batches are drawn exactly as ``train_local`` draws them
    (for comparisons; the accounting is then only an approximation). The sampling is
    seeded from ``seed``, or from OS entropy when it is None (see the module docstring).
    """
    collate = _PadCollate(data, tokenizer)
    generator = torch.Generator().manual_seed(_stream_seed(seed, _SAMPLING_STREAM))
    if poisson:
        return DataLoader(_Indices(len(data)), collate_fn=collate, generator=generator,
                          batch_size=settings.batch_size * settings.grad_accumulation)
    order = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    sampler = _ShuffledBatches(len(data), settings, order)
    # a generator of its own, or every new iterator draws its base seed from torch's global one
    return DataLoader(_Indices(len(data)), batch_sampler=sampler, collate_fn=collate,
                      generator=generator)


@contextlib.contextmanager
def private_training(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
    dp: DPSettings, noise_multiplier: float, poisson: bool = True, seed: int | None = None,
) -> Iterator[PrivateTraining]:
    """Attach Opacus to ``model`` for the duration of the block, and always detach it.

    Uses a fresh ``PrivacyEngine`` (hooks mode, no wrapper: the model object is used as
    it is) and ``make_private``. The noise comes from Opacus' secure RNG in secure mode,
    else from a generator seeded from ``seed``, or from OS entropy when it is None.

    Raises:
        SecureModeUnavailable: secure mode without ``torchcsprng``.
        UnsupportedLayerError: a trainable layer Opacus cannot handle (named).

    """
    check_secure_mode(dp)
    check_dp_compatible(model)
    detach_dp(model)  # leftovers of an interrupted round would double the hooks
    model.train()
    device = next(p.device for p in model.parameters() if p.requires_grad)
    noise_generator = None
    if not dp.secure_mode:
        noise_generator = torch.Generator(device=device)
        noise_generator.manual_seed(_stream_seed(seed, _NOISE_STREAM))
    with warnings.catch_warnings():
        # secure mode is an explicit setting here; Opacus warns on every engine without it
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
    try:
        try:
            _, dp_optimizer, dp_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
                poisson_sampling=poisson, grad_sample_mode="hooks", wrap_model=False,
                noise_generator=noise_generator)
        except (NotImplementedError, UnsupportedModuleError) as exc:
            raise UnsupportedLayerError(f"Opacus cannot train this model with DP-SGD: {exc}") \
                from exc
        rate = 1.0 / len(loader)
        size = len(loader.dataset)  # type: ignore[arg-type]
        dp_optimizer.expected_batch_size = size * rate  # type: ignore[assignment]  # unrounded
        yield PrivateTraining(optimizer=dp_optimizer, loader=dp_loader,
                              accountant=engine.accountant, sample_rate=rate)
    finally:
        detach_dp(model)
        for param in model.parameters():
            param.grad = None


def _batch_size(batch: Any) -> int:
    """Examples in a collated batch; Opacus gives an empty dict or list for an empty one."""
    if isinstance(batch, Mapping):
        return int(batch["input_ids"].shape[0])
    if all(len(t) == 0 for t in batch):
        return 0
    raise TypeError(f"unexpected batch of type {type(batch).__name__}")


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, without torch's note on hooks of layers fed by frozen inputs.

    The first LoRA factors see only frozen activations, so torch says their full backward
    hooks get output gradients only; output gradients are all Opacus' hooks use.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
        loss.backward()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def noise_only_step(optimizer: DPOptimizer) -> None:
    """One accounted DP step on an empty batch: zero per-sample gradients plus noise."""
    optimizer.zero_grad(set_to_none=True)
    for param in optimizer.params:
        param.grad_sample = param.new_zeros((0, *param.shape))
    optimizer.step()


def dp_step(
    model: torch.nn.Module, optimizer: DPOptimizer, batch: Any, *, physical_batch_size: int,
    device: torch.device, autocast: torch.dtype | None = None,
    task: Task | str = "classification",
) -> tuple[float | None, int]:
    """One DP-SGD step on a logical batch, in physical chunks of ``physical_batch_size``.

    An empty batch makes a noise-only step. Returns the batch's mean loss (None when
    empty) and its number of examples.
    """
    size = _batch_size(batch)
    if size == 0:
        noise_only_step(optimizer)
        return None, 0
    optimizer.zero_grad(set_to_none=True)
    starts = list(range(0, size, physical_batch_size))
    total = 0.0
    for start in starts:
        chunk = {k: v[start:start + physical_batch_size].to(device) for k, v in batch.items()}
        with _autocast(device, autocast):
            loss = dp_loss(model, chunk, task)
        _backward(loss)
        total += float(loss.detach()) * int(chunk["input_ids"].shape[0])
        if start != starts[-1]:
            optimizer.signal_skip_step(do_skip=True)  # clip and sum; no update yet
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    return total / size, size


def _endless(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def train_local_dp(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Encoded,
    settings: TrainSettings,
    *,
    dp: DPSettings,
    ledger: PrivacyLedger,
    device: torch.device,
    seed: int | None = None,
    autocast: torch.dtype | None = None,
    poisson: bool = True,
    target_steps: int | None = None,
) -> DPTrainResult:
    """Train the trainable parameters with DP-SGD (Opacus, AdamW) and record the round.

    Args:
        model: the (peft) model; only parameters with ``requires_grad`` are trained.
        tokenizer: pads the sampled examples.
        data: the client's tokenized partition.
        settings: steps or epochs, batch size (the expected Poisson batch), accumulation,
            learning rate, weight decay.
        dp: clip norm, noise or target epsilon, delta, accountant, budget, secure mode.
        ledger: the client's ledger for this partition; the round is added to it.
        device: where the model is.
        seed: None (the default) seeds the sampling and the noise from OS entropy, each
            round afresh; a number makes them reproducible by anyone who knows it, so the
            epsilon no longer holds against them (experiments only). Ignored in secure mode.
        autocast: autocast dtype, as for ``train_local``.
        poisson: False draws batches as ``train_local`` does (only for comparisons: the
            accounting assumes Poisson sampling).
        target_steps: the steps ``dp.target_epsilon`` is spread over (default: this round's).

    Raises:
        ValueError: empty partition, delta not below 1/n, a ledger of another accountant.
        PrivacyBudgetExceeded: the round would take epsilon past ``dp.epsilon_budget``.
        SecureModeUnavailable: secure mode without ``torchcsprng``.
        UnsupportedLayerError: a trainable layer Opacus cannot handle.

    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty partition")
    check_secure_mode(dp)
    if ledger.accountant != dp.accountant:
        raise ValueError(f"the ledger uses accountant '{ledger.accountant}', the DP settings "
                         f"'{dp.accountant}'")
    dp.check_delta(len(data))
    plan = plan_round(len(data), settings, dp=dp, target_steps=target_steps)
    _check_budget(ledger, dp, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    loader = dp_data_loader(data, tokenizer, settings, seed=seed, poisson=poisson)
    losses: list[float] = []
    empty = seen = 0
    start = time.perf_counter()
    with private_training(model, optimizer, loader, dp=dp, noise_multiplier=plan.noise_multiplier,
                          poisson=poisson, seed=seed) as private:
        batches = _endless(private.loader)
        for _ in range(plan.steps):
            loss, size = dp_step(model, private.optimizer, next(batches),
                                 physical_batch_size=settings.batch_size, device=device,
                                 autocast=autocast, task=data.task)
            seen += size
            if loss is None:
                empty += 1
            else:
                losses.append(loss)
        history = list(private.accountant.history)
    seconds = time.perf_counter() - start
    _record(ledger, history, plan)
    nan = float("nan")
    return DPTrainResult(
        steps=plan.steps, num_examples=len(data), loss_first=losses[0] if losses else nan,
        loss_mean=sum(losses) / len(losses) if losses else nan,
        loss_last=losses[-1] if losses else nan, seconds=seconds,
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
        max_grad_norm=dp.max_grad_norm, delta=dp.delta, epsilon=ledger.epsilon(dp.delta),
        accountant=dp.accountant, empty_steps=empty, examples_seen=seen,
    )


def _check_budget(ledger: PrivacyLedger, dp: DPSettings, plan: DPRoundPlan) -> None:
    if dp.epsilon_budget is None:
        return
    allowed, epsilon = budget_allows(ledger, dp, planned_steps=plan.steps,
                                     sample_rate=plan.sample_rate, noise=plan.noise_multiplier)
    if not allowed:
        raise PrivacyBudgetExceeded(
            f"this round ({plan.steps} steps, sample rate {plan.sample_rate:.4g}, noise "
            f"{plan.noise_multiplier:.4g}) would take epsilon from "
            f"{ledger.epsilon(dp.delta):.4g} to {epsilon:.4g} at delta {dp.delta:g}, past "
            f"epsilon-budget {dp.epsilon_budget:g}")


def _record(ledger: PrivacyLedger, history: list[Any], plan: DPRoundPlan) -> None:
    """Copy what Opacus' accountant counted into the ledger, after checking it."""
    counted = sum(int(steps) for _, _, steps in history)
    rates = {float(rate) for _, rate, _ in history}
    if counted != plan.steps or any(not math.isclose(r, plan.sample_rate) for r in rates):
        raise RuntimeError(f"Opacus accounted {counted} steps at rates {sorted(rates)}, "
                           f"planned {plan.steps} at {plan.sample_rate}")
    for noise, rate, steps in history:
        ledger.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
