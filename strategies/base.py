"""The Flower glue shared by every LoRA strategy: the round loop's four hooks.

Why one module of about 560 lines: it is the class a strategy subclasses; every hook it
may override sits beside the Flower method that calls it, so a strategy's author reads
one file. Sampling, messages, reply collection, aggregation wrappers and round
statistics live in their own modules.

:class:`LoraStrategy` implements Flower's message-based ``Strategy``:
``configure_train`` samples nodes (:mod:`strategies.messaging`) and builds one message
per node (payloads may differ per client); ``aggregate_train`` validates every reply
as it arrives (:mod:`strategies.collection`), leaves bad ones out with a logged reason,
and folds the good ones into the strategy's :class:`~strategies.aggregation.Aggregation`.
Linear rules (FedIT and its relatives) keep only a running sum, so the server's memory
does not grow with the number of clients in a round; others collect the updates and
call the strategy's pure aggregation function once the round's replies are in.

What a strategy implements (the hooks below): its settings (``config_class``), what each
node receives (``client_rank``, ``client_adapter``, ``client_alpha``, ``client_options``,
or the whole ``client_payload``), what it does on the client (``client_hooks``), how the
global adapter changes before a round (``prepare_global``), and how updates combine
(``start_aggregation`` for a streamed rule, or ``aggregate_adapters`` for one that needs
every update at once).

Robust aggregation (:mod:`strategies.robust`, the ``robust`` settings) screens updates
before they are aggregated: an update with a value above ``update-max-abs`` is rejected
as it arrives; with ``update-norm-bound`` above 0 or a robust ``aggregator``, a
:class:`~strategies.robust_round.RobustRound` holds the round's updates until all are in.
Client-level DP (``privacy.client_level.ClientLevelDP``, given as ``client_dp``) wraps
the aggregation: it clips each validated update, forces uniform weights and adds noise.
Secure aggregation (``privacy.secagg_flower.SecureAggregation``) wraps the strategy: the
server never sees an update, only the round's weighted mean, which it hands to
:meth:`LoraStrategy.aggregate_secure_mean`; a strategy whose rule is not linear in what
clients send says why in ``secure_aggregation_refusal`` (or
``secure_aggregation_refusal_for`` when it depends on its settings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from strategies.adapter import LoraAdapter
from strategies.aggregation import (
    SECURE_SUM_NODE,
    Aggregation,
    ClientDP,
    CollectedUpdates,
    PrivateAggregation,
    SecureMean,
)
from strategies.client_hooks import NO_HOOKS, ClientHooks
from strategies.codec import adapter_to_record, record_to_adapter
from strategies.collection import average_scores, collect_updates, round_metrics
from strategies.config import StrategyConfig, check
from strategies.errors import AggregationError, UpdateRejected
from strategies.instructions import ClientInstructions, ConfigValue
from strategies.messaging import (
    NodeSampler,
    Payload,
    check_sampling,
    connected_nodes,
    payload_message,
)
from strategies.parts import ADAPTER_PARTS, ALL_PARTS, select_parts
from strategies.robust import (
    COORDINATE_WISE,
    DEFAULT_COSINE_RATIO,
    DEFAULT_MAX_ABS,
    DEFAULT_MIN_COSINE,
    DEFAULT_NORM_BOUND,
    DEFAULT_TRIM_FRACTION,
    MEAN,
    RobustConfig,
    max_abs,
)
from strategies.robust_round import RobustRound
from strategies.round_stats import RoundStats
from strategies.validation import ClientUpdate, UpdateSpec


class LoraStrategy(Strategy):
    """Base class for LoRA-aware strategies.

    A subclass implements ``start_aggregation`` (a streamed rule) or
    ``aggregate_adapters`` (a rule over all of a round's updates), or both.

    Args:
        lora_alpha: the run's LoRA scaling alpha (scale of a module is alpha / rank).
        config: the strategy's own settings, an instance of its ``config_class``
            (default: that class's defaults).
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
    #: the strategy's own settings (run-config keys, defaults, checks)
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: what the strategy does on the client around local training
    client_hooks: ClassVar[ClientHooks] = NO_HOOKS
    #: parts a client trains, sends back, keeps private; parts the server sends down
    train_parts: ClassVar[frozenset[str]] = ADAPTER_PARTS
    send_parts: ClassVar[frozenset[str]] = ADAPTER_PARTS
    private_parts: ClassVar[frozenset[str]] = frozenset()
    download_parts: ClassVar[frozenset[str]] = ALL_PARTS
    #: whether a client must return exactly the rank it was sent (else any lower rank)
    exact_rank: ClassVar[bool] = True
    #: why client-level DP cannot wrap this strategy's aggregation ("" = it can)
    client_dp_refusal: ClassVar[str] = ""
    #: why the coordinate-wise aggregators (median, trimmed-mean) do not fit this strategy
    coordinate_wise_refusal: ClassVar[str] = ""
    #: why secure aggregation (the server sees only a weighted sum) cannot run it ("" = it can)
    secure_aggregation_refusal: ClassVar[str] = ""
    #: False under secure aggregation: metrics that need each update are skipped
    individual_updates_visible: bool = True

    def __init__(
        self,
        *,
        lora_alpha: float,
        config: StrategyConfig | None = None,
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
        cls = type(self)
        if cls.aggregate_adapters is LoraStrategy.aggregate_adapters and \
                cls.start_aggregation is LoraStrategy.start_aggregation:
            raise TypeError(f"{cls.__name__} implements neither start_aggregation nor "
                            "aggregate_adapters")
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(f"{cls.__name__} takes a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        robust = RobustConfig(aggregator=aggregator, trim_fraction=trim_fraction,
                              clip_norm=clip_norm, update_norm_bound=update_norm_bound,
                              update_max_abs=update_max_abs,
                              update_min_cosine=update_min_cosine,
                              update_cosine_ratio=update_cosine_ratio)
        self.check_robust(robust, client_dp=client_dp is not None)
        check_sampling(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                       fraction_evaluate=fraction_evaluate,
                       min_reply_fraction=min_reply_fraction, max_num_examples=max_num_examples)
        check(lora_alpha > 0, f"lora-alpha must be positive, got {lora_alpha}")
        overlap = self.private_parts & (self.send_parts | self.download_parts)
        if overlap:
            raise ValueError(
                f"{cls.__name__}: adapter part(s) {sorted(overlap)} are private but the "
                "strategy also sends or aggregates them; a part is either private or shared")
        self.config = config
        self.lora_alpha = lora_alpha
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.max_num_examples = max_num_examples
        self.min_reply_fraction = min_reply_fraction
        self.client_dp = client_dp
        self.robust = robust
        self.seed = seed
        self.sampler = NodeSampler(seed, max(min_available_nodes, min_train_nodes))
        self.history: dict[int, RoundStats] = {}
        self._specs: dict[int, UpdateSpec] = {}
        self._payloads: dict[int, Payload] = {}
        self._global: LoraAdapter | None = None

    @property
    def min_available_nodes(self) -> int:
        """Sampling waits until this many nodes are connected."""
        return self.sampler.min_available_nodes

    # ------------------------------------------------------------------ hooks

    @classmethod
    def check_robust(cls, robust: RobustConfig, *, client_dp: bool) -> None:
        """Refuse robust and client-level DP settings this strategy cannot honour.

        Raises:
            ConfigError: client-level DP for a strategy that refuses it
                (``client_dp_refusal``), a coordinate-wise aggregator for one that refuses
                it (``coordinate_wise_refusal``), or any aggregator but ``mean`` under
                client-level DP: its noise is calibrated to a uniform mean of updates
                clipped to ``client-dp-clip``, and a median, a trimmed mean or a second,
                data-dependent clip has another sensitivity.

        """
        check(not (robust.aggregator in COORDINATE_WISE and cls.coordinate_wise_refusal),
              f"{cls.name} does not support aggregator={robust.aggregator}: "
              f"{cls.coordinate_wise_refusal}")
        check(not (client_dp and cls.client_dp_refusal),
              f"{cls.name} does not support client-level DP (client-dp-noise above 0): "
              f"{cls.client_dp_refusal}")
        check(
            not (client_dp and robust.aggregator != MEAN),
            f"aggregator={robust.aggregator} does not compose with client-level DP "
            "(client-dp-noise above 0): DP's noise is calibrated to the uniform mean of "
            "updates clipped to client-dp-clip, which already bounds every client's "
            "influence; a median, trimmed mean or second clip changes that sensitivity. "
            "Use aggregator=mean with client-level DP, or client-dp-noise=0")

    @classmethod
    def secure_aggregation_refusal_for(cls, config: StrategyConfig) -> str:
        """Why secure aggregation cannot run this strategy with ``config`` ("" = it can).

        It can when the new global adapter is the data-size weighted mean of what clients
        send (at the global shapes: a lower rank zero-pads), whatever the strategy does
        with that mean afterwards; default: :attr:`secure_aggregation_refusal`.
        """
        return cls.secure_aggregation_refusal

    def client_rank(self, node_id: int, global_adapter: LoraAdapter) -> int:
        """The LoRA rank of node ``node_id`` this round (default: the global rank)."""
        return global_adapter.max_rank

    def client_options(self, server_round: int, node_id: int) -> dict[str, ConfigValue]:
        """Options sent to a client for its hooks (default: the strategy's settings).

        The client's hooks parse them with the same ``config_class``.
        """
        return dict(self.config.to_run_config())

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

    def initial_global(self, adapter: LoraAdapter,
                       base_weights: Callable[[], Mapping[str, np.ndarray]]) -> LoraAdapter:
        """The global adapter a new run starts from (default: the fresh ``adapter``).

        ``base_weights()`` gives the pretrained weight (``out x in``) of every adapted
        module, for strategies that initialise from them; it is called only if needed.
        """
        return adapter

    def prepare_global(self, server_round: int, global_adapter: LoraAdapter,
                       grid: Grid) -> LoraAdapter:
        """The global adapter this round starts from (default: as it is)."""
        return global_adapter

    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """The new global adapter from the validated updates (default: stream them)."""
        aggregation = self.start_aggregation(server_round, global_adapter)
        for update in updates:
            aggregation.add(update)
        return aggregation.result()

    def start_aggregation(self, server_round: int, global_adapter: LoraAdapter) -> Aggregation:
        """The accumulator for this round (default: collect, then ``aggregate_adapters``)."""
        return CollectedUpdates(self, server_round, global_adapter)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as if never stopped (JSON-serialisable).

        The node-sampling generator's state and, with client-level DP, its accountant's
        history (so epsilon keeps counting); subclasses add theirs (ranks, stages).
        """
        state: dict[str, Any] = {"rng": self.sampler.state()}
        if self.client_dp is not None:
            state["client_dp"] = self.client_dp.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: client-level DP is on but the saved run did not use it (its
                earlier rounds released unnoised aggregates that no epsilon covers).

        """
        self.sampler.load_state(state["rng"])
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


    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample nodes with this strategy's own seeded generator; waits for enough nodes."""
        return self.sampler.sample(grid, fraction, minimum)

    @staticmethod
    def connected_nodes(grid: Grid, at_least: int) -> list[int]:
        """The connected nodes (sorted), once at least ``at_least`` are."""
        return connected_nodes(grid, at_least)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node with its payload and instructions."""
        global_adapter = self.prepare_global(server_round, record_to_adapter(arrays,
                                                                             self.lora_alpha), grid)
        self._global = global_adapter
        nodes = self.sample(grid, self.fraction_train, self.min_train_nodes)
        stats = RoundStats(round=server_round, sampled=len(nodes),
                           available=self.sampler.available)
        self.history[server_round] = stats
        self._specs = {}
        self._payloads = {}
        messages = []
        shared: dict[tuple[int, frozenset[str]], ArrayRecord] = {}
        for node_id in nodes:
            payload = self.client_payload(server_round, node_id, global_adapter)
            message, nbytes = payload_message(payload, node_id, config, MessageType.TRAIN,
                                              shared)
            self._specs[node_id] = self.update_spec(node_id, payload)
            self._payloads[node_id] = payload
            stats.bytes_down += nbytes
            messages.append(message)
        log(INFO, "round %d: sampled %d nodes", server_round, len(nodes))
        return messages

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
            for update in collect_updates(replies, stats, self._specs, self._payloads,
                                          self.check_magnitude):
                aggregation.add(update)
            if robust is not None:
                robust.screen()
        except ValueError as exc:
            raise AggregationError(f"round {server_round}: aggregation failed: {exc}") from exc
        return self._release(server_round, stats, aggregation, private, aggregation.count)

    def summand_shapes(self) -> dict[str, tuple[int, ...]]:
        """What each client adds into this round's secure sum: key -> shape.

        The parts clients send, at the shapes of the round's global adapter (a client at
        a lower rank zero-pads its factors to them).
        """
        if self._global is None:
            raise AggregationError("summand_shapes called before configure_train")
        parts = {p for payload in self._payloads.values()
                 for p in payload.instructions.send_parts} or self.send_parts
        return {k: tuple(v.shape) for k, v in
                select_parts(self._global.to_state_dict(), parts).items()}

    def aggregate_secure_mean(
        self, server_round: int, mean: SecureMean
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate a secure round from the weighted mean of its clients' summands.

        The strategy's aggregation receives one update, the mean, weighted by the summed
        weight: a rule that is linear in what clients send returns it unchanged, then
        applies whatever it does with an average. Under client-level DP each client
        clipped its own change and the noise is set for ``mean.contributors`` clients.
        """
        if self._global is None:
            raise AggregationError("aggregate_secure_mean called before configure_train")
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        for node_id in mean.contributors:
            stats.accepted += 1
            stats.client_ranks[node_id] = mean.ranks.get(node_id, self._global.max_rank)
        stats.train_loss = mean.train_loss
        self.note_secure_ranks(mean.ranks)
        adapter = LoraAdapter.from_state_dict({**self._global.to_state_dict(), **mean.state},
                                              self._global.alpha)
        update = ClientUpdate(node_id=SECURE_SUM_NODE, num_examples=max(1, round(mean.weight)),
                              state=dict(mean.state), metrics={}, adapter=adapter)
        aggregation: Aggregation | PrivateAggregation = self.start_aggregation(
            server_round, self._global)
        private: PrivateAggregation | None = None
        try:
            if self.client_dp is not None:
                private = aggregation = self.client_dp.wrap(
                    aggregation, server_round=server_round, sampled=max(stats.sampled, 1),
                    available=max(stats.available, stats.sampled, 1),
                    reference=self.sent_tensors)
                private.add_mean(update, len(mean.contributors))
            else:
                aggregation.add(update)
        except ValueError as exc:
            raise AggregationError(f"round {server_round}: aggregation failed: {exc}") from exc
        return self._release(server_round, stats, aggregation, private, len(mean.contributors))

    def note_secure_ranks(self, ranks: Mapping[int, int]) -> None:
        """The ranks clients reported in a secure round (default: nothing to keep)."""

    def _release(
        self, server_round: int, stats: RoundStats, aggregation: Aggregation | PrivateAggregation,
        private: PrivateAggregation | None, count: int,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Finish a round of ``count`` updates: abandon it with too few, else publish it."""
        log(INFO, "round %d: %d accepted, %d rejected, %d failed", server_round,
            stats.accepted, stats.rejected, stats.failed)
        if count == 0:
            log(WARNING, "round %d: no valid update; the global adapter is unchanged",
                server_round)
            return None, round_metrics(stats)
        if count < self.min_reply_fraction * stats.sampled:
            log(WARNING, "round %d abandoned: %d valid updates of %d sampled nodes is below "
                "min-reply-fraction %.2f; the global adapter is unchanged", server_round,
                count, stats.sampled, self.min_reply_fraction)
            stats.metrics["abandoned"] = 1.0
            return None, round_metrics(stats)
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
            return None, round_metrics(stats)
        self._global = new_global
        return adapter_to_record(new_global), round_metrics(stats)

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

    def sent_payload(self, node_id: int) -> Payload | None:
        """What node ``node_id`` was sent this round (None: it was not sampled)."""
        return self._payloads.get(node_id)

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
        return [payload_message(self.client_payload(server_round, n, global_adapter),
                                n, config, MessageType.EVALUATE)[0] for n in nodes]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' scores; malformed replies are left out."""
        averaged = average_scores(replies, server_round, self.max_num_examples)
        if not averaged:
            return None
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        stats.metrics.update(averaged)
        return MetricRecord(averaged)
