"""The Flower glue shared by every LoRA strategy.

:class:`LoraStrategy` extends Flower's message-based ``FedAvg`` and fills its hooks:
``configure_train`` builds one message per sampled node (payloads may differ per
client), ``aggregate_train`` validates every reply as it arrives, leaves bad ones out
with a logged reason, and folds the good ones into the strategy's :class:`Aggregation`.
Linear rules (FedIT and its relatives) keep only a running sum, so the server's memory
does not grow with the number of clients in a round; others collect the updates and
call the strategy's pure aggregation function once the round's replies are in.

Robust aggregation (:mod:`strategies.robust`, the ``robust`` settings) screens updates
before they are aggregated: an update with a value above ``update-max-abs`` is rejected
as it arrives; with ``update-norm-bound`` above 0 or a robust ``aggregator``, a
:class:`RobustRound` holds the round's updates until all are in (the median change norm
is not known before), rejects those whose change is above the bound, and then feeds the
rest to the strategy's own aggregation: clipped (``norm-clip``), or as they are with the
averaged tensors of the result replaced by their coordinate-wise median or trimmed mean.
With ``update-norm-bound=0`` and ``aggregator=mean`` the round streams as before.

Client-level DP (``privacy.client_level.ClientLevelDP``, given as ``client_dp``) wraps
that aggregation: it clips each validated update, forces uniform weights and adds noise
to the result. This package does not import ``privacy``: the server builds the mechanism
and hands it over (:class:`ClientDP` says what it must provide).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, ClassVar, Protocol

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies.adapter import LoraAdapter
from strategies.instructions import ClientInstructions, ConfigValue
from strategies.parts import ALL_PARTS, select_parts
from strategies.robust import (
    COORDINATE_WISE,
    DEFAULT_COSINE_RATIO,
    DEFAULT_MAX_ABS,
    DEFAULT_MIN_COSINE,
    DEFAULT_NORM_BOUND,
    DEFAULT_TRIM_FRACTION,
    MEAN,
    NORM_CLIP,
    RobustConfig,
    capped_counts,
    change_norm,
    clip_factors,
    combine,
    cosine_threshold,
    max_abs,
    median_direction_cosines,
    norm_threshold,
    pad_to,
    scale_change,
)
from strategies.validation import (
    ClientUpdate,
    UpdateRejected,
    UpdateSpec,
    validate_num_examples,
    validate_update,
)
from strategies.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    adapter_to_record,
    record_nbytes,
    record_to_adapter,
    state_to_record,
)

NODE_POLL_INTERVAL = 0.2  # seconds between looks at the connected nodes while waiting


class AggregationError(RuntimeError):
    """A round whose accepted updates could not be aggregated."""


@dataclass
class RoundStats:
    """What happened in one training round, for logs and the results folder."""

    round: int
    sampled: int = 0
    available: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    rejections: list[tuple[int, str]] = field(default_factory=list)
    #: (node, error) of each reply that came back as an error (the client failed)
    failures: list[tuple[int, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    client_ranks: dict[int, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict[str, float]] = field(default_factory=dict)
    #: per accepted node: the bytes it uploaded and its (train loss, example count)
    node_bytes: dict[int, int] = field(default_factory=dict)
    node_losses: dict[int, tuple[float, int]] = field(default_factory=dict)
    _loss_sum: float = field(default=0.0, repr=False)
    _loss_weight: float = field(default=0.0, repr=False)

    def reject(self, node_id: int, reason: str) -> None:
        """Count and log a rejected update."""
        self.rejected += 1
        self.rejections.append((node_id, reason))
        log(WARNING, "round %d: rejected update from node %d: %s", self.round, node_id, reason)

    def accept(self, node_id: int, rank: int, nbytes: int, metrics: Mapping[str, float],
               num_examples: int) -> None:
        """Count a valid update: its rank, bytes, train loss and example-level epsilon."""
        self.accepted += 1
        self.client_ranks[node_id] = rank
        self.node_bytes[node_id] = nbytes
        self.bytes_up += nbytes
        if "train-loss" in metrics:
            self.node_losses[node_id] = (metrics["train-loss"], num_examples)
            self._loss_sum += metrics["train-loss"] * num_examples
            self._loss_weight += num_examples
            self.train_loss = self._loss_sum / self._loss_weight
        if "dp-epsilon" in metrics:  # cumulative example-level epsilon (DP-SGD)
            epsilons = self.details.setdefault("client_epsilon", {})
            epsilons[str(node_id)] = metrics["dp-epsilon"]
            self.metrics["dp-epsilon-max"] = max(epsilons.values())
        if metrics.get("dropped-examples"):  # records the client's data could not use
            dropped = self.details.setdefault("client_dropped_examples", {})
            dropped[str(node_id)] = int(metrics["dropped-examples"])
            self.metrics["dropped-examples"] = float(sum(dropped.values()))

    def withdraw(self, node_id: int, reason: str) -> None:
        """Reject an update that was counted as valid (robust screening, once all are in)."""
        self.accepted -= 1
        self.client_ranks.pop(node_id, None)
        self.bytes_up -= self.node_bytes.pop(node_id, 0)
        if self.node_losses.pop(node_id, None) is not None:
            self._update_train_loss()
        epsilons = self.details.get("client_epsilon", {})
        if epsilons.pop(str(node_id), None) is not None:
            if epsilons:
                self.metrics["dp-epsilon-max"] = max(epsilons.values())
            else:
                self.metrics.pop("dp-epsilon-max", None)
        dropped = self.details.get("client_dropped_examples", {})
        if dropped.pop(str(node_id), None) is not None:
            self.metrics["dropped-examples"] = float(sum(dropped.values()))
        self.reject(node_id, reason)

    def _update_train_loss(self) -> None:
        self._loss_sum = sum(loss * n for loss, n in self.node_losses.values())
        self._loss_weight = sum(n for _, n in self.node_losses.values())
        self.train_loss = self._loss_sum / self._loss_weight if self._loss_weight else None


class Aggregation(ABC):
    """Folds one round's validated updates, one at a time, into the next global adapter."""

    count: int = 0

    @abstractmethod
    def add(self, update: ClientUpdate) -> None:
        """Fold in one validated update (its message can be dropped afterwards)."""

    @abstractmethod
    def result(self) -> LoraAdapter:
        """The new global adapter from every update added so far."""


class PrivateAggregation(Protocol):
    """A round's aggregation under client-level DP; ``metrics`` are its round figures."""

    count: int
    metrics: dict[str, float]

    def add(self, update: ClientUpdate) -> None:
        """Clip and fold in one validated update."""

    def result(self) -> LoraAdapter:
        """The noisy aggregate (charged to the privacy ledger)."""


class ClientDP(Protocol):
    """Client-level DP around a strategy's aggregation (``privacy.client_level.ClientLevelDP``)."""

    def wrap(self, aggregation: Aggregation, *, server_round: int, sampled: int,
             available: int, reference: Callable[[int], Mapping[str, np.ndarray]],
             ) -> PrivateAggregation:
        """The round's aggregation with clipping, uniform weights and noise."""

    def metrics(self) -> dict[str, float]:
        """Cumulative figures reported every round (the client-level epsilon)."""

    def describe(self) -> str:
        """One line for the logs."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for a resumed run (the accountant's history)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class CollectedUpdates(Aggregation):
    """Keeps every update and applies the strategy's rule once all are in.

    For rules that need all updates at once (FlexLoRA's SVD of their sum): each update
    kept is its adapter factors and counts; the reply messages are not kept.
    """

    def __init__(self, strategy: LoraStrategy, server_round: int,
                 global_adapter: LoraAdapter) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.global_adapter = global_adapter
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        """Keep the update."""
        self.updates.append(update)
        self.count += 1

    def result(self) -> LoraAdapter:
        """The strategy's :meth:`LoraStrategy.aggregate_adapters` over the kept updates."""
        return self.strategy.aggregate_adapters(self.server_round, self.global_adapter,
                                                self.updates)


class RobustRound(Aggregation):
    """A round's robust screening and aggregation around the strategy's own aggregation.

    Holds every accepted update until the round's replies are all in, because the
    norm bound is relative to the round's median change norm, which is not known before;
    the server's memory then grows with the updates per round, as for HetLoRA and
    FlexLoRA (``update-norm-bound=0`` with ``aggregator=mean`` keeps the streaming path).

    The change of an update is what the node sent minus what it was sent, one L2 norm
    over all those tensors (:func:`strategies.robust.change_norm`): the factors (or the
    one factor) and the head for FedIT and its relatives, the sparse deltas in SLoRA's
    first stage, the node's own-rank factors for HetLoRA and FlexLoRA. For FlexLoRA, which
    aggregates products, a bound on the factors' change also bounds the product's:
    ``||B A - B0 A0|| <= ||dB|| ||A0|| + ||B0|| ||dA|| + ||dB|| ||dA||``.

    :meth:`screen` rejects updates above the bound; :meth:`result` then feeds the rest
    to the strategy's aggregation (its weights, metrics and bookkeeping, such as HetLoRA's
    ranks, unchanged): with ``norm-clip`` each change clipped and the example counts
    capped at the round's median; with ``median`` or ``trimmed-mean`` as they are, and the
    tensors clients sent are then replaced in the result by their coordinate-wise
    aggregate over the clients (unweighted; lower-rank factors zero-padded to the global
    rank, as HetLoRA pads them). Parts clients do not send stay the strategy's. The
    strategy's own round metrics then describe its mean, computed on the way (FedIT's
    aggregation error is that of the mean, not of the median).
    """

    def __init__(self, strategy: LoraStrategy, inner: Aggregation, server_round: int) -> None:
        self.strategy = strategy
        self.config = strategy.robust
        self.inner = inner
        self.server_round = server_round
        self.held: list[tuple[ClientUpdate, float]] = []
        self.screened = False

    @property
    def stats(self) -> RoundStats:
        """The round's stats (rejections are recorded there)."""
        return self.strategy.history.setdefault(self.server_round,
                                                RoundStats(round=self.server_round))

    def add(self, update: ClientUpdate) -> None:
        """Measure the update's change and keep it until the round is complete."""
        norm = change_norm(update.state, self.strategy.sent_tensors(update.node_id))
        self.held.append((update, norm))
        self.count += 1

    def screen(self) -> None:
        """Reject the updates above the norm bound, then those against the median direction.

        The direction screen runs on the updates the norm bound kept (so a huge update
        cannot move the median it is judged by).
        """
        if self.screened:
            return
        self.screened = True
        self._screen_norms()
        self._screen_directions()

    def _screen_directions(self) -> None:
        """Reject the updates whose change has a cosine below ``update-min-cosine``."""
        threshold = self.config.update_min_cosine
        if threshold <= -1 or len(self.held) < 3:  # a median of two is their mean
            return
        references = [self.strategy.sent_tensors(u.node_id) for u, _ in self.held]
        shapes: dict[str, tuple[int, ...]] = {}
        for reference in references:
            for key, value in reference.items():
                old = shapes.get(key, tuple(value.shape))
                shapes[key] = tuple(max(a, b) for a, b in zip(old, value.shape, strict=True))
        cosines = median_direction_cosines([u.state for u, _ in self.held], references,
                                           shapes)
        limit = cosine_threshold(cosines, threshold, self.config.update_cosine_ratio)
        stats = self.stats
        stats.details["update_cosines"] = {str(u.node_id): c
                                           for (u, _), c in zip(self.held, cosines, strict=True)}
        self._withdraw([
            f"update direction: cosine {cosine:.3f} with the round's median change is below "
            f"{limit:.3f} (update-min-cosine {threshold:g}, or update-cosine-ratio "
            f"{self.config.update_cosine_ratio:g} x the round's median cosine)"
            if cosine < limit else None for cosine in cosines])

    def _withdraw(self, reasons: Sequence[str | None]) -> None:
        """Withdraw each held update whose reason is not None (one reason per held update)."""
        kept = []
        for (update, norm), reason in zip(self.held, reasons, strict=True):
            if reason is None:
                kept.append((update, norm))
            else:
                self.stats.withdraw(update.node_id, reason)
        self.held = kept
        self.count = len(kept)

    def _screen_norms(self) -> None:
        """Reject the updates whose change norm exceeds ``update-norm-bound`` x the median."""
        norms = [n for _, n in self.held]
        stats = self.stats
        stats.details["update_norms"] = {str(u.node_id): n for u, n in self.held}
        if not norms:
            return
        median = float(np.median(norms))
        stats.metrics["update-norm-median"] = median
        limit = norm_threshold(norms, self.config.update_norm_bound)
        if limit is None:
            return
        self._withdraw([
            f"update norm {norm:.4g} exceeds update-norm-bound "
            f"{self.config.update_norm_bound:g} x the round's median update norm "
            f"{median:.4g} (= {limit:.4g})" if norm > limit else None for norm in norms])

    def result(self) -> LoraAdapter:
        """The strategy's aggregate of the screened updates, under the robust aggregator."""
        self.screen()
        if not self.held:
            raise ValueError("an aggregate needs at least one update")
        if self.config.aggregator == NORM_CLIP:
            self._feed_clipped()
        else:
            for update, _ in self.held:
                self.inner.add(update)
        aggregate = self.inner.result()
        if self.config.aggregator in COORDINATE_WISE:
            aggregate = self._coordinate_wise(aggregate)
        return aggregate

    def _feed_clipped(self) -> None:
        """Clip each change to ``clip-norm`` (or the median norm); cap the example counts."""
        updates = [u for u, _ in self.held]
        norms = [n for _, n in self.held]
        limit = self.config.clip_norm or float(np.median(norms))
        factors = clip_factors(norms, limit)
        counts = capped_counts([u.num_examples for u in updates])
        for update, factor, count in zip(updates, factors, counts, strict=True):
            state, adapter = update.state, update.adapter
            if factor < 1.0 and adapter is not None:
                state = scale_change(update.state, self.strategy.sent_tensors(update.node_id),
                                     factor)
                adapter = type(adapter).from_state_dict({**adapter.to_state_dict(), **state},
                                                        adapter.alpha)
            self.inner.add(dataclasses.replace(update, state=state, adapter=adapter,
                                               num_examples=count))
        stats = self.stats
        stats.metrics["robust-clip-norm"] = limit
        stats.metrics["robust-clipped-fraction"] = sum(f < 1.0 for f in factors) / len(factors)

    def _coordinate_wise(self, aggregate: LoraAdapter) -> LoraAdapter:
        """``aggregate`` with every tensor clients sent replaced by its robust combination."""
        state = aggregate.to_state_dict()
        updates = [u for u, _ in self.held]
        keys = dict.fromkeys(k for u in updates for k in u.state)
        for key in keys:
            if key not in state:
                raise ValueError(f"the aggregate has no tensor '{key}' to replace")
            shape = tuple(state[key].shape)
            combined = combine([pad_to(u.state[key], shape) for u in updates if key in u.state],
                               self.config.aggregator, self.config.trim_fraction)
            state[key] = combined.astype(state[key].dtype)
        return LoraAdapter.from_state_dict(state, aggregate.alpha)


@dataclass(frozen=True)
class Payload:
    """What one node receives: its adapter, the parts of it that travel, its instructions."""

    adapter: LoraAdapter
    instructions: ClientInstructions
    sent_parts: frozenset[str] = ALL_PARTS


class LoraStrategy(FedAvg):
    """Base class for LoRA-aware strategies; subclasses implement ``aggregate_adapters``.

    Args:
        lora_alpha: the run's LoRA scaling alpha (scale of a module is alpha / rank).
        fraction_train: fraction of connected nodes sampled each round.
        min_train_nodes: at least this many nodes are sampled each round.
        min_available_nodes: sampling waits until this many nodes are connected.
        max_num_examples: replies reporting more examples are rejected.
        fraction_evaluate: fraction of nodes asked for federated evaluation (0 = none).
        min_evaluate_nodes: at least this many nodes evaluate when it is above 0.
        seed: seeds the node sampling.
        min_reply_fraction: a round aggregates only if at least this share of the sampled
            nodes sent a valid update; otherwise it is abandoned (global unchanged).
        client_dp: client-level DP around every round's aggregation (None = off); refused
            by strategies whose rule is not linear in the factors (``client_dp_refusal``).
        aggregator, trim_fraction, clip_norm, update_norm_bound, update_max_abs,
            update_min_cosine, update_cosine_ratio: robust
            aggregation (:class:`strategies.robust.RobustConfig`). Under client-level DP
            only ``aggregator="mean"`` is accepted and the relative norm bound is not
            applied (the DP clip bounds every update; see :meth:`check_robust`).

    """

    name: ClassVar[str] = "base"
    #: parts a client trains, sends back, keeps private; parts the server sends down
    train_parts: ClassVar[frozenset[str]] = ALL_PARTS
    send_parts: ClassVar[frozenset[str]] = ALL_PARTS
    private_parts: ClassVar[frozenset[str]] = frozenset()
    download_parts: ClassVar[frozenset[str]] = ALL_PARTS
    #: whether a client must return exactly the rank it was sent (else any lower rank)
    exact_rank: ClassVar[bool] = True
    #: why client-level DP cannot wrap this strategy's aggregation ("" = it can)
    client_dp_refusal: ClassVar[str] = ""
    #: why the coordinate-wise aggregators (median, trimmed-mean) do not fit this strategy
    coordinate_wise_refusal: ClassVar[str] = ""

    def __init__(
        self,
        *,
        lora_alpha: float,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        max_num_examples: int = 1_000_000,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        seed: int = 0,
        min_reply_fraction: float = 0.0,
        client_dp: ClientDP | None = None,
        aggregator: str = MEAN,
        trim_fraction: float = DEFAULT_TRIM_FRACTION,
        clip_norm: float = 0.0,
        update_norm_bound: float = DEFAULT_NORM_BOUND,
        update_max_abs: float = DEFAULT_MAX_ABS,
        update_min_cosine: float = DEFAULT_MIN_COSINE,
        update_cosine_ratio: float = DEFAULT_COSINE_RATIO,
    ) -> None:
        robust = RobustConfig(aggregator=aggregator, trim_fraction=trim_fraction,
                              clip_norm=clip_norm, update_norm_bound=update_norm_bound,
                              update_max_abs=update_max_abs,
                              update_min_cosine=update_min_cosine,
                              update_cosine_ratio=update_cosine_ratio)
        self.check_robust(robust, client_dp=client_dp is not None)
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {fraction_train}")
        if not 0.0 <= min_reply_fraction <= 1.0:
            raise ValueError(f"min-reply-fraction must be in [0, 1], got {min_reply_fraction}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {fraction_evaluate}")
        if min_train_nodes < 1:
            raise ValueError(f"min-train-nodes must be at least 1, got {min_train_nodes}")
        if max_num_examples < 1:
            raise ValueError(f"max-num-examples must be at least 1, got {max_num_examples}")
        if not lora_alpha > 0:
            raise ValueError(f"lora-alpha must be positive, got {lora_alpha}")
        overlap = self.private_parts & (self.send_parts | self.download_parts)
        if overlap:
            raise ValueError(
                f"{type(self).__name__}: adapter part(s) {sorted(overlap)} are private but the "
                "strategy also sends or aggregates them; a part is either private or shared")
        if client_dp is not None and self.client_dp_refusal:
            raise ValueError(f"{self.name} does not support client-level DP "
                             f"(client-dp-noise above 0): {self.client_dp_refusal}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=max(min_available_nodes, min_train_nodes),
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.lora_alpha = lora_alpha
        self.max_num_examples = max_num_examples
        self.min_reply_fraction = min_reply_fraction
        self.client_dp = client_dp
        self.robust = robust
        self.history: dict[int, RoundStats] = {}
        self._rng = random.Random(seed)
        self._specs: dict[int, UpdateSpec] = {}
        self._payloads: dict[int, Payload] = {}
        self._global: LoraAdapter | None = None
        self._available = 0

    # ------------------------------------------------------------------ hooks

    @classmethod
    def check_robust(cls, robust: RobustConfig, *, client_dp: bool) -> None:
        """Refuse robust settings this strategy (or client-level DP) cannot honour.

        Raises:
            ValueError: a coordinate-wise aggregator for a strategy that refuses it
                (``coordinate_wise_refusal``), or any aggregator but ``mean`` under
                client-level DP: its noise is calibrated to a uniform mean of updates
                clipped to ``client-dp-clip``, and a median, a trimmed mean or a second,
                data-dependent clip has another sensitivity.

        """
        if robust.aggregator in COORDINATE_WISE and cls.coordinate_wise_refusal:
            raise ValueError(f"{cls.name} does not support aggregator={robust.aggregator}: "
                             f"{cls.coordinate_wise_refusal}")
        if client_dp and robust.aggregator != MEAN:
            raise ValueError(
                f"aggregator={robust.aggregator} does not compose with client-level DP "
                "(client-dp-noise above 0): DP's noise is calibrated to the uniform mean of "
                "updates clipped to client-dp-clip, which already bounds every client's "
                "influence; a median, trimmed mean or second clip changes that sensitivity. "
                "Use aggregator=mean with client-level DP, or client-dp-noise=0")

    @classmethod
    def options_from(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Strategy-specific constructor arguments from the flat run settings (none here)."""
        return {}

    def client_rank(self, node_id: int, global_adapter: LoraAdapter) -> int:
        """The LoRA rank of node ``node_id`` this round (default: the global rank)."""
        return global_adapter.max_rank

    def client_options(self, server_round: int, node_id: int) -> dict[str, ConfigValue]:
        """Strategy-specific options sent to a client (default: none)."""
        return {}

    def client_adapter(
        self, server_round: int, node_id: int, global_adapter: LoraAdapter, rank: int
    ) -> LoraAdapter:
        """The adapter node ``node_id`` starts from (default: the global one)."""
        return global_adapter

    def client_payload(
        self, server_round: int, node_id: int, global_adapter: LoraAdapter
    ) -> Payload:
        """What node ``node_id`` receives this round."""
        rank = self.client_rank(node_id, global_adapter)
        adapter = self.client_adapter(server_round, node_id, global_adapter, rank)
        instructions = ClientInstructions(
            server_round=server_round, strategy=self.name, rank=rank,
            alpha=self.client_alpha(rank, global_adapter), train_parts=self.train_parts,
            send_parts=self.send_parts, private_parts=self.private_parts,
            options=self.client_options(server_round, node_id),
        )
        return Payload(adapter, instructions, self.download_parts)

    def client_alpha(self, rank: int, global_adapter: LoraAdapter) -> float:
        """The alpha of a client at ``rank`` (default: the run's alpha)."""
        return self.lora_alpha

    def update_spec(self, node_id: int, payload: Payload) -> UpdateSpec:
        """What a valid reply looks like, given what the node was sent."""
        spec = UpdateSpec.matching(payload.adapter, max_num_examples=self.max_num_examples,
                                   exact_rank=self.exact_rank)
        required = frozenset(select_parts(payload.adapter.to_state_dict(),
                                          payload.instructions.send_parts))
        return dataclasses.replace(spec, required_keys=required)

    @abstractmethod
    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """The new global adapter from the validated updates (a pure function)."""

    def start_aggregation(self, server_round: int, global_adapter: LoraAdapter) -> Aggregation:
        """The accumulator for this round (default: collect, then ``aggregate_adapters``)."""
        return CollectedUpdates(self, server_round, global_adapter)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as if never stopped (JSON-serialisable).

        The node-sampling generator's state and, with client-level DP, its accountant's
        history (so epsilon keeps counting); subclasses add theirs (ranks, stages).
        """
        version, internal, gauss = self._rng.getstate()
        state: dict[str, Any] = {"rng": [version, list(internal), gauss]}
        if self.client_dp is not None:
            state["client_dp"] = self.client_dp.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: client-level DP is on but the saved run did not use it (its
                earlier rounds released unnoised aggregates that no epsilon covers).

        """
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        if self.client_dp is not None:
            if "client_dp" not in state:
                raise ValueError(
                    "resume: client-level DP is on (client-dp-noise above 0) but the saved run "
                    "did not use it, so its rounds are not covered by any epsilon; resume with "
                    "client-dp-noise=0 or start a new run in another results-dir")
            self.client_dp.load_state_dict(state["client_dp"])
        elif "client_dp" in state:
            log(WARNING, "resume: the saved run used client-level DP; this one does not "
                "(client-dp-noise=0), so later rounds are not private")

    # ------------------------------------------------------------ Flower API

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> LoRA strategy: %s (alpha %s)", self.name, self.lora_alpha)
        log(INFO, "\t├──> %s", self.robust.describe())
        if self.client_dp is not None:
            log(INFO, "\t├──> %s", self.client_dp.describe())
            if self.robust.update_norm_bound > 0 or self.robust.update_min_cosine > -1:
                log(INFO, "\t├──> update-norm-bound and update-min-cosine not applied: "
                    "client-level DP clips every "
                    "update to client-dp-clip; a screen relative to the round's median would "
                    "make one client's inclusion depend on the others' updates, which the DP "
                    "accounting does not cover")
        super().summary()

    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample nodes with this strategy's own seeded generator; waits for enough nodes."""
        nodes = self.connected_nodes(grid, max(minimum, self.min_available_nodes))
        self._available = len(nodes)
        return self._rng.sample(nodes, max(int(len(nodes) * fraction), minimum))

    @staticmethod
    def connected_nodes(grid: Grid, at_least: int) -> list[int]:
        """The connected nodes (sorted), once at least ``at_least`` are; logs while it waits."""
        next_log = time.monotonic()
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= at_least:
                return nodes
            if time.monotonic() >= next_log:
                log(INFO, "waiting for nodes: %d connected, %d needed", len(nodes), at_least)
                next_log = time.monotonic() + 10
            time.sleep(NODE_POLL_INTERVAL)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node with its payload and instructions."""
        global_adapter = record_to_adapter(arrays, self.lora_alpha)
        self._global = global_adapter
        nodes = self.sample(grid, self.fraction_train, self.min_train_nodes)
        stats = RoundStats(round=server_round, sampled=len(nodes), available=self._available)
        self.history[server_round] = stats
        self._specs = {}
        messages = []
        self._payloads = {}
        shared: dict[tuple[int, frozenset[str]], ArrayRecord] = {}
        for node_id in nodes:
            payload = self.client_payload(server_round, node_id, global_adapter)
            message, nbytes = self.payload_message(payload, node_id, config, MessageType.TRAIN,
                                                   shared)
            self._specs[node_id] = self.update_spec(node_id, payload)
            self._payloads[node_id] = payload
            stats.bytes_down += nbytes
            messages.append(message)
        log(INFO, "round %d: sampled %d nodes", server_round, len(nodes))
        return messages

    def collect_updates(
        self, server_round: int, replies: Iterable[Message]
    ) -> Iterator[ClientUpdate]:
        """Validate replies as they arrive; count and log failures and rejections.

        Yields each valid update once; the caller folds it in and drops it, so no more
        than one reply is held at a time. An update with a value above ``update-max-abs``
        is rejected here, with the other validation rules. Train loss and client
        epsilons are kept in the round's stats as running figures.
        """
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        seen: set[int] = set()
        for message in replies:
            node_id = message.metadata.src_node_id
            if message.has_error():
                stats.failed += 1
                stats.failures.append((node_id, str(message.error.reason)))
                log(WARNING, "round %d: node %d failed: %s", server_round, node_id,
                    message.error.reason)
                continue
            spec = self._specs.get(node_id)
            try:
                if spec is None:
                    raise UpdateRejected("reply from a node not sampled in this round")
                if node_id in seen:
                    raise UpdateRejected("second reply from the same node in this round")
                update = validate_update(message.content, spec, node_id=node_id)
                self.check_magnitude(update)
                update.adapter = LoraAdapter.from_state_dict(
                    {**self._payloads[node_id].adapter.to_state_dict(), **update.state},
                    self._payloads[node_id].instructions.alpha,
                )
            except UpdateRejected as exc:
                stats.reject(node_id, exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - a malformed reply never crashes the server
                stats.reject(node_id, f"malformed reply ({type(exc).__name__}: {exc})")
                continue
            seen.add(node_id)
            stats.accept(node_id, update.adapter.max_rank,
                         record_nbytes(message.content.array_records[ARRAYS_KEY]),
                         update.metrics, update.num_examples)
            del message
            yield update
        missing = stats.sampled - stats.accepted - stats.rejected - stats.failed
        if missing > 0:
            stats.metrics["num-missing"] = float(missing)
            log(WARNING, "round %d: no reply from %d sampled node(s) reached the strategy "
                "(round timeout, or dropped by the transport layer); left out",
                server_round, missing)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply as it arrives and fold it in; report round metrics.

        A round with no valid update, or fewer than ``min-reply-fraction`` of the
        sampled nodes, is abandoned: the global adapter stays unchanged.
        """
        if self._global is None:
            raise AggregationError("aggregate_train called before configure_train")
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        aggregation: Aggregation | PrivateAggregation = self.start_aggregation(
            server_round, self._global)
        robust: RobustRound | None = None
        private: PrivateAggregation | None = None
        if self.client_dp is not None:
            private = aggregation = self.client_dp.wrap(
                aggregation, server_round=server_round, sampled=max(stats.sampled, 1),
                available=max(stats.available, stats.sampled, 1), reference=self.sent_tensors)
            stats.metrics.update(private.metrics)
        elif self.robust.holds_round:
            robust = aggregation = RobustRound(self, aggregation, server_round)
        try:
            for update in self.collect_updates(server_round, replies):
                aggregation.add(update)
            if robust is not None:
                robust.screen()
        except ValueError as exc:
            raise AggregationError(f"round {server_round}: aggregation failed: {exc}") from exc
        log(INFO, "round %d: %d accepted, %d rejected, %d failed", server_round,
            stats.accepted, stats.rejected, stats.failed)
        if aggregation.count == 0:
            log(WARNING, "round %d: no valid update; the global adapter is unchanged",
                server_round)
            return None, self.round_metrics(stats)
        if aggregation.count < self.min_reply_fraction * stats.sampled:
            log(WARNING, "round %d abandoned: %d valid updates of %d sampled nodes is below "
                "min-reply-fraction %.2f; the global adapter is unchanged", server_round,
                aggregation.count, stats.sampled, self.min_reply_fraction)
            stats.metrics["abandoned"] = 1.0
            return None, self.round_metrics(stats)
        try:
            new_global = aggregation.result()
        except ValueError as exc:
            raise AggregationError(f"round {server_round}: aggregation failed: {exc}") from exc
        if private is not None:
            stats.metrics.update(private.metrics)
        not_finite = [k for k, v in new_global.items() if not np.isfinite(v).all()]
        if not_finite:  # cannot happen with update-max-abs on; never publish it anyway
            log(WARNING, "round %d abandoned: the aggregate is not finite in %s; the global "
                "adapter is unchanged (keep update-max-abs above 0)", server_round,
                not_finite[:3])
            stats.metrics["abandoned"] = 1.0
            return None, self.round_metrics(stats)
        self._global = new_global
        return adapter_to_record(new_global), self.round_metrics(stats)

    def check_magnitude(self, update: ClientUpdate) -> None:
        """Reject an update holding a value above ``update-max-abs`` in magnitude.

        Raises:
            UpdateRejected: naming the tensor, the value and the setting.

        """
        cap = self.robust.update_max_abs
        if cap > 0:
            key, largest = max_abs(update.state)
            if largest > cap:
                raise UpdateRejected(f"{key}: a value of magnitude {largest:.4g} exceeds "
                                     f"update-max-abs {cap:g}")

    def sent_tensors(self, node_id: int) -> dict[str, np.ndarray]:
        """The tensors node ``node_id`` was sent this round, for the parts it sends back."""
        payload = self._payloads[node_id]
        return select_parts(payload.adapter.to_state_dict(), payload.instructions.send_parts)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation with each node's payload and instructions.

        A node scores the adapter it would train: its rank, its private parts.
        """
        if self.fraction_evaluate == 0.0:
            return []
        global_adapter = record_to_adapter(arrays, self.lora_alpha)
        nodes = self.sample(grid, self.fraction_evaluate, max(self.min_evaluate_nodes, 1))
        return [self.payload_message(self.client_payload(server_round, n, global_adapter),
                                     n, config, MessageType.EVALUATE)[0] for n in nodes]

    @staticmethod
    def payload_message(
        payload: Payload, node_id: int, config: ConfigRecord, message_type: str,
        shared: dict[tuple[int, frozenset[str]], ArrayRecord] | None = None,
    ) -> tuple[Message, int]:
        """The message carrying ``payload`` to ``node_id``, and its array payload in bytes.

        Payloads with the same adapter object and parts share one ``ArrayRecord`` through
        ``shared`` (as Flower's FedAvg shares one record): the server's outgoing messages
        then cost one copy of the adapter, not one per sampled node.
        """
        key = (id(payload.adapter), payload.sent_parts)
        record = None if shared is None else shared.get(key)
        if record is None:
            record = state_to_record(select_parts(payload.adapter.to_state_dict(),
                                                  payload.sent_parts))
            if shared is not None:
                shared[key] = record
        node_config = ConfigRecord(dict(config))
        node_config.update(payload.instructions.to_config())
        content = RecordDict({ARRAYS_KEY: record, CONFIG_KEY: node_config})
        message = Message(content=content, message_type=message_type, dst_node_id=node_id)
        return message, record_nbytes(record)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' scores; malformed replies are left out."""
        totals: dict[str, float] = {}
        weight = 0
        for message in replies:
            try:
                metrics = message.content.metric_records[METRICS_KEY]
                n = validate_num_examples(metrics["num-examples"], self.max_num_examples)
                scores = {k: float(v) for k, v in metrics.items()
                          if k.startswith("eval-") and isinstance(v, int | float)}
            except Exception as exc:  # noqa: BLE001 - a bad reply never crashes the server
                log(WARNING, "round %d: evaluation reply left out: %s", server_round, exc)
                continue
            if not all(math.isfinite(v) for v in scores.values()):
                continue
            weight += n
            for key, value in scores.items():
                totals[key] = totals.get(key, 0.0) + n * value
        if weight == 0:
            return None
        averaged = {f"fed-{k}": v / weight for k, v in totals.items()}
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        stats.metrics.update(averaged)
        return MetricRecord(averaged)

    @staticmethod
    def round_metrics(stats: RoundStats) -> MetricRecord:
        """The round's counters as a Flower ``MetricRecord``."""
        record = MetricRecord(
            {
                "num-accepted": stats.accepted,
                "num-rejected": stats.rejected,
                "num-failed": stats.failed,
                "bytes-up": stats.bytes_up,
                "bytes-down": stats.bytes_down,
            }
        )
        if stats.train_loss is not None:
            record["train-loss"] = stats.train_loss
        record.update(stats.metrics)
        return record
