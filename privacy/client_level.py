"""Client-level (central) differential privacy on the server: DP-FedAvg with fixed clipping.

The mechanism (McMahan et al., ICLR 2018; Flower's ``DifferentialPrivacyServerSideFixedClipping``):
each accepted update's change ``delta_k = x_k - x_sent`` over the tensors the client sends
is clipped to L2 norm ``C`` (one norm over all those tensors, in float64), the updates are
averaged with uniform weights, and Gaussian noise of std ``sigma * C / m`` is added to the
average, ``m`` being the number of nodes sampled that round (a fixed denominator, as in
Flower). Removing one client changes the sum of clipped deltas by at most ``C``, so each
round is a sampled Gaussian mechanism with noise multiplier ``sigma``; the client-level
epsilon is composed over rounds with Opacus' RDP accountant
(:class:`privacy.accounting.PrivacyLedger`), one step per released round, sample rate
``q = sampled / available nodes``.

Why not Flower's wrapper (``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping``
in flwr 1.42, helpers in ``flwr.supercore.differential_privacy``):

- it decodes every reply (``to_numpy_ndarrays``) and clips it before fedlora validates it:
  a reply with a wrong shape or a missing array makes ``compute_clip_model_update``
  (``np.subtract``, ``zip(strict=True)``) raise, and the exception crashes the server;
- it pairs reply arrays with the global arrays by position, not by key: an honest FFA-LoRA
  reply (B and the head) has its first B subtracted from the global's first A, and the
  round raises; a partial reply whose shapes happen to line up is clipped against the
  wrong tensors, silently;
- it adds noise to every array of the aggregate, including parts that were neither trained
  nor sent (FFA-LoRA's frozen A must stay at its seeded value, FedSA-LoRA's B at its init);
- it needs the round's replies as a list (``list(replies)``); fedlora streams them;
- one error reply skips the whole round's aggregation, and its noise comes from numpy's
  global, unseeded generator (not reproducible);
- its accountant accepts only unchanged ``FedAvg.aggregate_train`` with equal client
  weights and no sampling amplification; without the accountant it clips but keeps the
  strategy's data-size weights, so one client's weight, and its sensitivity, exceed 1/m.

Here, :class:`ClientLevelDP` wraps the strategy's own streaming aggregation (the
``Aggregation`` of :mod:`strategies.base`): it sees only updates that passed validation,
pairs tensors by key with what that node was sent, clips in the space of what the node
sends (HetLoRA: at the node's own rank), hands the strategy ``sent + clipped delta`` with
``num_examples = 1`` (uniform weights), and adds noise to exactly the coordinates clients
send. It fits every strategy that aggregates linearly in the factors: FedIT, FFA-LoRA,
FedSA-LoRA, SLoRA (both stages) and HetLoRA (with uniform weights). FlexLoRA (an SVD of the
sum of products) refuses it. This module imports nothing from ``strategies``: updates,
adapters and aggregations are used through their attributes only.

What the epsilon covers, and what it assumes:

- each client's whole contribution, in the add/remove-one-client sense, for the released
  global adapters; not the round metrics (train loss, aggregation error, the clipped
  fraction, HetLoRA's reported ranks), which are computed from unnoised updates, as in
  Flower;
- the number of valid replies ``m'`` and the clients' ranks are treated as public. When
  ``m' < m`` (failures, rejections), the average divides by ``m'`` while the noise stays
  ``sigma C / m``, so the round's effective noise multiplier is ``sigma m' / m``; that is
  what the ledger records (Flower only warns);
- fedlora samples a fixed-size subset without replacement; the RDP bound used is that of
  Poisson subsampling at ``q = m / N``, the standard approximation. With
  ``fraction-train = 1.0`` (the default) ``q = 1`` and the bound is exact. Amplification
  also assumes the sample is hidden from the adversary: the node sampling is seeded from
  the run seed, so keep the seed private or count on ``q = 1`` only;
- HetLoRA's rank self-pruning makes a client's rank depend on its data; set
  ``hetlora-threshold = 0`` (no pruning) for ranks that are public;
- the noise comes from numpy's PCG64. With ``secure_seed=True`` (setting
  ``client-dp-secure-seed``, true by default) it is seeded from the OS CSPRNG
  (:mod:`secrets`); with ``secure_seed=False`` from the run seed and the round, so a run
  is reproducible, for research only: anyone who knows the seed (every client sees the
  run config) can subtract the noise. PCG64 itself is still not a cryptographically secure generator
  and floating-point Gaussian sampling has known attacks, so production use wants a vetted
  DP noise library (a CSPRNG and discrete or snapped Gaussian sampling).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np
from flwr.supercore import log

from privacy.accounting import PrivacyLedger

#: separates this generator's streams from every other use of the run seed
NOISE_STREAM = 0x636C6470  # "cldp"

EPSILON_METRIC = "client-dp-epsilon"
CLIPPED_METRIC = "client-dp-clipped-fraction"
NOISE_STD_METRIC = "client-dp-noise-std"


class _Adapter(Protocol):
    """What the mechanism uses of an adapter (``strategies.adapter.LoraAdapter``)."""

    alpha: float

    def to_state_dict(self) -> dict[str, np.ndarray]: ...  # noqa: D102

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray], alpha: float) -> Any: ...  # noqa: D102


class _Update(Protocol):
    """What the mechanism uses of a validated update (``strategies.validation.ClientUpdate``)."""

    node_id: int
    num_examples: int
    state: dict[str, np.ndarray]
    adapter: Any


class _Aggregation(Protocol):
    """A strategy's streaming aggregation (``strategies.base.Aggregation``)."""

    count: int

    def add(self, update: Any) -> None: ...  # noqa: D102

    def result(self) -> Any: ...  # noqa: D102


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def leading_block(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The leading ``shape`` block of ``array`` (a view): what a lower-rank factor starts from.

    Raises:
        ValueError: ``shape`` has another number of dimensions or exceeds ``array``.

    """
    _check(len(shape) == array.ndim and all(s <= a for s, a in zip(shape, array.shape,
                                                                    strict=True)),
           f"an update of shape {shape} does not fit the sent array of shape {array.shape}")
    return array[tuple(slice(0, s) for s in shape)]


def clip_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float, float]:
    """Clip the change ``update - reference`` to L2 norm ``clip_norm``, over all tensors.

    Tensors are paired by key; a tensor smaller than its reference (a client that pruned
    its rank) is compared with the reference's leading block. The norm is the L2 norm of
    the concatenated change, computed in float64.

    Returns:
        ``(clipped, norm, factor)``: ``reference + factor * (update - reference)`` per key,
        in each update tensor's dtype, with ``factor = min(1, clip_norm / norm)``; an
        update within the bound is returned as it is (same arrays).

    Raises:
        ValueError: ``clip_norm`` is not positive, or a key or shape has no reference.

    """
    _check(clip_norm > 0, f"client-dp-clip must be positive, got {clip_norm}")
    missing = sorted(set(update) - set(reference))
    _check(not missing, f"update tensors {missing[:5]} were not sent to the client")
    base = {k: leading_block(reference[k], tuple(v.shape)) for k, v in update.items()}
    squared = 0.0
    for key, value in update.items():
        change = value.astype(np.float64) - base[key].astype(np.float64)
        squared += float(np.dot(change.ravel(), change.ravel()))
    norm = math.sqrt(squared)
    if norm <= clip_norm:
        return dict(update), norm, 1.0
    factor = clip_norm / norm
    clipped = {}
    for key, value in update.items():
        ref = base[key].astype(np.float64)
        clipped[key] = (ref + factor * (value.astype(np.float64) - ref)).astype(value.dtype)
    return clipped, norm, factor


class ClientLevelDP:
    """Client-level DP for one run: clip norm, noise, delta, noise seed and the ledger.

    Args:
        noise_multiplier: ``sigma``: the noise std on the sum of clipped deltas over the
            clip norm (0 clips without noise; epsilon is then infinite and not reported).
        clip_norm: ``C``, the L2 bound on each client's change per round.
        delta: the delta of the reported (epsilon, delta); should be well below one over
            the number of clients.
        seed: the run seed; the noise of round ``t`` comes from ``(seed, t)``.
        secure_seed: seed the noise from the OS CSPRNG instead (not reproducible).
        accountant: Opacus accountant for the ledger (``rdp``).

    Raises:
        ValueError: a setting out of range, naming it.

    """

    def __init__(self, *, noise_multiplier: float, clip_norm: float = 1.0, delta: float = 1e-5,
                 seed: int = 0, secure_seed: bool = False, accountant: str = "rdp") -> None:
        _check(math.isfinite(noise_multiplier) and noise_multiplier >= 0,
               f"client-dp-noise must be a finite number >= 0, got {noise_multiplier}")
        _check(math.isfinite(clip_norm) and clip_norm > 0,
               f"client-dp-clip (the clip norm) must be positive, got {clip_norm}")
        _check(0.0 < delta < 1.0, f"client-dp-delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.seed = int(seed)
        self.secure_seed = secure_seed
        self.ledger = PrivacyLedger(accountant)
        self._epsilon: tuple[list[tuple[float, float, int]], float] | None = None

    def describe(self) -> str:
        """One line for the logs."""
        seed = "OS CSPRNG" if self.secure_seed else f"run seed {self.seed}"
        return (f"client-level DP: clip {self.clip_norm:g}, noise multiplier "
                f"{self.noise_multiplier:g}, delta {self.delta:g}, noise from the {seed}")

    def noise_std(self, sampled: int) -> float:
        """The std of the noise on the average: ``sigma * C / m``."""
        _check(sampled >= 1, f"a round needs at least one sampled node, got {sampled}")
        return self.noise_multiplier * self.clip_norm / sampled

    def generator(self, server_round: int) -> np.random.Generator:
        """The noise generator of a round: from ``(seed, round)``, or the OS CSPRNG."""
        if self.secure_seed:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([NOISE_STREAM, self.seed, server_round])

    def epsilon(self) -> float:
        """Client-level epsilon spent so far at ``delta`` (0 before any release).

        Cached until the ledger changes: Opacus' RDP bound for a sample rate below 1
        takes about 0.1 s.
        """
        history = self.ledger.history
        if self._epsilon is None or self._epsilon[0] != history:
            self._epsilon = (history, self.ledger.epsilon(self.delta))
        return self._epsilon[1]

    def metrics(self) -> dict[str, float]:
        """The cumulative figures reported every round (none when there is no noise)."""
        if self.noise_multiplier == 0:
            return {}
        return {EPSILON_METRIC: self.epsilon()}

    def record_release(self, *, sampled: int, accepted: int, available: int) -> None:
        """Charge one released aggregate of ``accepted`` of ``sampled`` of ``available`` nodes.

        The effective noise multiplier is ``sigma * accepted / sampled`` (the average
        divides by ``accepted``, the noise by ``sampled``); the sample rate
        ``sampled / available``.
        """
        _check(1 <= accepted <= sampled <= available,
               f"need 1 <= accepted ({accepted}) <= sampled ({sampled}) <= available "
               f"({available})")
        self.ledger.record(noise_multiplier=self.noise_multiplier * accepted / sampled,
                           sample_rate=sampled / available, steps=1)

    def wrap(self, aggregation: _Aggregation, *, server_round: int, sampled: int,
             available: int, reference: Callable[[int], Mapping[str, np.ndarray]],
             ) -> ClientDPRound:
        """The round's aggregation with clipping, uniform weights, noise and accounting.

        Args:
            aggregation: the strategy's aggregation for this round.
            server_round: the round (seeds the noise).
            sampled: ``m``, the nodes sampled this round.
            available: the nodes connected when they were sampled.
            reference: node id -> the tensors that node was sent, for the keys it sends.

        """
        _check(1 <= sampled <= available,
               f"need 1 <= sampled ({sampled}) <= available ({available}) nodes")
        if self.noise_multiplier > 0 and self.delta >= 1.0 / available:
            log(WARNING, "client-level DP: delta %g is not below 1/%d (one over the number of "
                "clients); a mechanism could then publish a whole client and still claim it",
                self.delta, available)
        return ClientDPRound(self, aggregation, server_round=server_round, sampled=sampled,
                             available=available, reference=reference)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for a resumed run: the ledger's history."""
        return {"ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; epsilon keeps counting from the saved history.

        Raises:
            ValueError: the state is malformed.

        """
        if not isinstance(state, Mapping) or "ledger" not in state:
            raise ValueError("a client-level DP state needs the key 'ledger'")
        self.ledger.load_state_dict(state["ledger"])


class ClientDPRound:
    """One round of :class:`ClientLevelDP` around a strategy's streaming aggregation.

    ``add`` clips each validated update and folds ``sent + clipped delta`` into the inner
    aggregation with ``num_examples = 1``; ``result`` adds the noise to the coordinates
    clients sent and charges the ledger. ``metrics`` holds the round's figures.
    """

    def __init__(self, mechanism: ClientLevelDP, inner: _Aggregation, *, server_round: int,
                 sampled: int, available: int,
                 reference: Callable[[int], Mapping[str, np.ndarray]]) -> None:
        self.mechanism = mechanism
        self.inner = inner
        self.server_round = server_round
        self.sampled = sampled
        self.available = available
        self.reference = reference
        self.clipped = 0
        #: per sent key, the largest shape any client sent (the coordinates that get noise)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.metrics: dict[str, float] = mechanism.metrics()

    #: a secure round's client count (its one update is their mean); None: one per update
    contributors: int | None = None

    @property
    def count(self) -> int:
        """Updates folded in so far (a secure round: the clients in its mean)."""
        return self.inner.count if self.contributors is None else self.contributors

    def add_mean(self, update: _Update, contributors: int) -> None:
        """Fold in a secure round's mean of ``contributors`` updates, each clipped by its client.

        Under secure aggregation each client clips its own change to the clip norm before
        masking (:mod:`privacy.secagg_flower`); the server cannot clip what it cannot
        see, so it folds the mean in as it is, with uniform weight, and its noise and
        accounting count ``contributors`` clients.
        """
        if self.inner.count or self.contributors is not None:
            raise ValueError("a secure round's mean is its only update")
        for key, value in update.state.items():
            self.shapes[key] = tuple(value.shape)
        self.contributors = contributors
        self.inner.add(dataclasses.replace(update, num_examples=1))

    def add(self, update: _Update) -> None:
        """Clip the update's change, force uniform weight, fold it into the inner aggregation."""
        if update.adapter is None:
            raise ValueError(f"update from node {update.node_id} carries no adapter")
        clipped, norm, factor = clip_update(update.state, self.reference(update.node_id),
                                            self.mechanism.clip_norm)
        if factor < 1.0:
            self.clipped += 1
            log(INFO, "round %d: node %d's update (norm %.4g) clipped to %g", self.server_round,
                update.node_id, norm, self.mechanism.clip_norm)
            state = update.adapter.to_state_dict()
            state.update(clipped)
            adapter = type(update.adapter).from_state_dict(state, update.adapter.alpha)
        else:
            adapter = update.adapter
        for key, value in clipped.items():
            shape = self.shapes.get(key, tuple(value.shape))
            self.shapes[key] = tuple(max(a, b) for a, b in zip(shape, value.shape, strict=True))
        self.inner.add(dataclasses.replace(update, state=clipped, adapter=adapter,
                                           num_examples=1))

    def result(self) -> Any:
        """The inner aggregate plus ``N(0, (sigma C / m)^2)`` on every coordinate sent."""
        aggregate = self.inner.result()
        accepted = self.count
        std = self.mechanism.noise_std(self.sampled)
        if std > 0:
            state = aggregate.to_state_dict()
            rng = self.mechanism.generator(self.server_round)
            for key in sorted(self.shapes):
                if key not in state:
                    raise ValueError(f"the aggregate has no tensor '{key}' to add noise to")
                noisy = state[key].astype(np.float64)
                block = leading_block(noisy, self.shapes[key])
                block += std * rng.standard_normal(block.shape)
                state[key] = noisy.astype(state[key].dtype)
            aggregate = type(aggregate).from_state_dict(state, aggregate.alpha)
            self.mechanism.record_release(sampled=self.sampled, accepted=accepted,
                                          available=self.available)
            if accepted < self.sampled:
                log(WARNING, "round %d: client-level DP: %d of %d sampled nodes contributed; "
                    "the noise was set for %d, so this round counts with noise multiplier %.4g",
                    self.server_round, accepted, self.sampled, self.sampled,
                    self.mechanism.noise_multiplier * accepted / self.sampled)
        self.metrics = {**self.mechanism.metrics(),
                        NOISE_STD_METRIC: std}
        if self.contributors is None:  # clients clip their own in a secure round
            self.metrics[CLIPPED_METRIC] = self.clipped / accepted if accepted else 0.0
        return aggregate
