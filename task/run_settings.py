"""Settings of the whole run: federation, the chosen strategy's own settings, and the task.

Parsed once per process (the server's, and every client's: both read their defaults
from here) from Flower's flat run config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from privacy.secagg_config import SecureAggregationConfig
from strategies import StrategyConfig, get_strategy_class
from strategies.config import (
    ConfigError,
    check,
    from_run_config,
    setting,
    settings_keys,
    to_run_config,
)
from strategies.messaging import check_sampling
from strategies.registry import strategy_config, strategy_keys
from strategies.robust import MEAN, RobustConfig
from task.settings import DEFAULT_NUM_ROUNDS, TaskSettings

if TYPE_CHECKING:
    import torch

#: the experiment trackers ``tracker`` may name (:mod:`server.tracking`)
TRACKERS = ("tensorboard", "mlflow")


@dataclass(frozen=True)
class FederationSettings:
    """Rounds, sampling, timeouts, validation caps, evaluation and results.

    ``eval_every``: evaluate the global adapter on the held-out split every k rounds
    (the last round always); ``eval_subset``: evaluate intermediate rounds on this many
    held-out examples (a fixed, seeded subset; 0 = all; the last round always uses all);
    ``keep_checkpoints``: how many per-round checkpoints to keep; ``resume``: continue
    from the last completed round saved in ``<results-dir>/state`` (a fresh start when
    there is none); ``eval_batch_size``: 0 = :func:`task.training.auto_eval_batch_size`.
    ``server_key_file``: the server's long-term payload key (a new one per run if empty);
    ``client_keys_file``: the client signing keys admitted at the payload layer (empty:
    clients are not authenticated there, see :mod:`privacy.client_keys`).
    ``client_dp_*``: client-level DP on the server
    (:mod:`privacy.client_level`): noise multiplier (0 = off), clip norm, delta, and
    whether the noise is seeded from the OS instead of the run seed.
    ``max_failed_rounds``: stop the run after this many rounds in a row without an
    accepted update (0 = never); a round in which every client failed with the same
    error stops it at once. ``tracker``: experiment trackers, comma-separated
    (``tensorboard``, ``mlflow``; :mod:`server.tracking`); ``mlflow_tracking_uri``: an
    MLflow server (empty: a local store in the results folder). The robust-aggregation settings are
    :class:`strategies.robust.RobustConfig`'s, a part of :class:`RunSettings` of their own.
    """

    strategy: str = setting("fedit", "the aggregation strategy (docs/strategies.md)")
    num_rounds: int = setting(DEFAULT_NUM_ROUNDS, "federated rounds")
    fraction_train: float = setting(1.0, "share of connected nodes sampled each round (seeded)")
    min_train_nodes: int = setting(2, "at least this many nodes train each round")
    min_available_nodes: int = setting(2, "sampling waits until this many nodes are connected")
    fraction_evaluate: float = setting(
        0.0, "share of nodes doing federated evaluation (0 = server-side only)")
    min_reply_fraction: float = setting(
        0.0,
        "a round aggregates only if at least this share of the sampled nodes sent a valid "
        "update")
    round_timeout: float = setting(3600.0, "seconds to wait for replies in a round")
    max_num_examples: int = setting(1_000_000, "replies reporting more examples are rejected")
    seed: int = setting(
        0, "seeds the split, the partitions, the adapter init, sampling and client data order")
    results_dir: str = setting("results/latest", "the results folder")
    eval_every: int = setting(
        1, "evaluate the global adapter every k rounds (the last round always)")
    eval_subset: int = setting(
        0,
        "evaluate intermediate rounds on a fixed, seeded subset of this many held-out "
        "examples (0 = all)")
    eval_batch_size: int = setting(
        0, "server-side evaluation batch size (0 = auto: 16 on CPU, 64 on a GPU)")
    keep_checkpoints: int = setting(
        2, "per-round checkpoints kept (0 = none; final_adapter is always saved)")
    resume: bool = setting(
        False, "continue after the last completed round saved in <results-dir>/state")
    encrypt_payloads: bool = setting(
        True,
        "seal adapters end to end (X25519 + AES-GCM); fedlora simulate turns it off "
        "unless asked")
    server_key_file: str = setting(
        "", "the server's long-term payload key (empty: one kept in the server's state folder)")
    client_keys_file: str = setting(
        "",
        "the client signing keys admitted at the payload layer (empty: clients not "
        "authenticated there)")
    client_dp_noise: float = setting(
        0.0, "client-level DP on the server: noise multiplier (0 = off)")
    client_dp_clip: float = setting(
        1.0, "client-level DP: L2 bound on each client's change per round")
    client_dp_delta: float = setting(1e-5, "client-level DP: the delta of the reported epsilon")
    client_dp_secure_seed: bool = setting(
        True,
        "client-level DP: noise from the OS CSPRNG (false: from the run seed, "
        "reproducible, not private)")
    max_failed_rounds: int = setting(
        3,
        "stop after this many rounds in a row without an accepted update (0 = never); "
        "every client failing with the same error stops the run at once")
    tracker: str = setting(
        "", "experiment tracking: tensorboard, mlflow (comma-separated; empty = none)")
    mlflow_tracking_uri: str = setting(
        "", "an MLflow server (empty: a local store in the results folder)")

    def __post_init__(self) -> None:
        checks = [
            (self.num_rounds >= 1, f"num-rounds must be at least 1, got {self.num_rounds}"),
            (self.round_timeout > 0, f"round-timeout must be positive, got {self.round_timeout}"),
            (self.eval_every >= 1, f"eval-every must be at least 1, got {self.eval_every}"),
            (self.eval_subset >= 0, f"eval-subset must not be negative, got {self.eval_subset}"),
            (self.eval_batch_size >= 0,
             f"eval-batch-size must not be negative, got {self.eval_batch_size} (0 = auto)"),
            (self.max_failed_rounds >= 0,
             f"max-failed-rounds must not be negative (0 = never stop), got "
             f"{self.max_failed_rounds}"),
            (self.keep_checkpoints >= 0,
             f"keep-checkpoints must not be negative, got {self.keep_checkpoints}"),
            (bool(self.results_dir), "results-dir must not be empty"),
            (math.isfinite(self.client_dp_noise) and self.client_dp_noise >= 0,
             f"client-dp-noise must be a finite number >= 0 (0 = off), got "
             f"{self.client_dp_noise}"),
            (math.isfinite(self.client_dp_clip) and self.client_dp_clip > 0,
             f"client-dp-clip (the clip norm) must be positive, got {self.client_dp_clip}"),
            (0 < self.client_dp_delta < 1,
             f"client-dp-delta must be in (0, 1), got {self.client_dp_delta}"),
        ]
        for ok, message in checks:
            check(ok, message)
        unknown = [n for n in self.trackers if n not in TRACKERS]
        check(not unknown, f"tracker {unknown[:1]} is not one of {', '.join(TRACKERS)} "
              "(comma-separated, or empty for none)")
        check_sampling(fraction_train=self.fraction_train, min_train_nodes=self.min_train_nodes,
                       fraction_evaluate=self.fraction_evaluate,
                       min_reply_fraction=self.min_reply_fraction,
                       max_num_examples=self.max_num_examples)
        get_strategy_class(self.strategy)  # an unknown name fails here, listing them

    @property
    def trackers(self) -> tuple[str, ...]:
        """The experiment trackers named in ``tracker`` (comma-separated)."""
        return tuple(dict.fromkeys(n.strip() for n in self.tracker.split(",") if n.strip()))

    def eval_batch(self, device: torch.device) -> int:
        """The evaluation batch size on ``device`` (``eval-batch-size``, or auto when 0)."""
        from task.training import auto_eval_batch_size

        return self.eval_batch_size or auto_eval_batch_size(device)


@dataclass(frozen=True)
class RunSettings:
    """The whole run: federation, robust aggregation, the chosen strategy's settings, the task.

    Parsed once per process from the flat run config (:meth:`from_run_config`) and
    passed down as this object; ``strategy`` is an instance of the chosen strategy's
    registered config class (:mod:`strategies.registry`); ``robust`` is the robust
    aggregation's (:class:`strategies.robust.RobustConfig`); ``secure`` is secure
    aggregation's (:class:`privacy.secagg_config.SecureAggregationConfig`).
    """

    federation: FederationSettings
    task: TaskSettings
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    secure: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)

    def __post_init__(self) -> None:
        cls = get_strategy_class(self.federation.strategy)
        if type(self.strategy) is not cls.config_class:
            raise ConfigError(f"strategy {self.federation.strategy} takes a "
                              f"{cls.config_class.__name__}, got {type(self.strategy).__name__}")
        self.strategy.check_run(num_rounds=self.federation.num_rounds,
                                lora_rank=self.task.lora.lora_rank)
        cls.check_robust(self.robust, client_dp=self.federation.client_dp_noise > 0)
        if self.secure.secure_aggregation:
            refusal = cls.secure_aggregation_refusal_for(self.strategy)
            check(not refusal, f"strategy {self.federation.strategy} cannot run with "
                  f"secure-aggregation=true: {refusal}")
            check(self.federation.min_train_nodes >= 2,
                  "secure-aggregation=true needs min-train-nodes of at least 2: the sum of "
                  f"one client is its update (got {self.federation.min_train_nodes})")
            check(self.robust.aggregator == MEAN,
                  f"aggregator={self.robust.aggregator} needs every client's update, which "
                  "secure-aggregation=true hides from the server (it sees only their sum); "
                  "use aggregator=mean, or secure-aggregation=false")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Parse a flat run config once; unknown keys are an error listing the known ones.

        Keys of strategies other than the chosen one are accepted and ignored (the
        ``[tool.flwr.app.config]`` table lists every strategy's).
        """
        known = cls.keys()
        unknown = sorted(set(config) - known)
        check(not unknown,
              f"unknown setting(s) {unknown}; known settings: {', '.join(sorted(known))}")
        federation = from_run_config(FederationSettings, config)
        return cls(
            federation=federation,
            task=TaskSettings.from_run_config(config),
            strategy=strategy_config(federation.strategy, config),
            robust=from_run_config(RobustConfig, config),
            secure=from_run_config(SecureAggregationConfig, config),
        )

    def describe(self, num_clients: int | None = None) -> list[str]:
        """The run's header: model, data, strategy, clients, rounds, privacy, results."""
        fed, task = self.federation, self.task
        train = task.train
        work = (f"{train.local_epochs} local epoch(s)" if train.local_epochs
                else f"{train.local_steps} local steps")
        clients = f"{num_clients} clients, " if num_clients is not None else ""
        privacy = task.privacy
        if not privacy.dp:
            dp_sgd = "off"
        elif privacy.dp_target_epsilon > 0:
            dp_sgd = f"target epsilon {privacy.dp_target_epsilon:g}"
        else:
            dp_sgd = f"noise multiplier {privacy.dp_noise_multiplier:g}"
        client_dp = (f"noise {fed.client_dp_noise:g}, clip {fed.client_dp_clip:g}"
                     if fed.client_dp_noise > 0 else "off")
        return [
            f"fedlora: {task.model.model} on {task.data.dataset} ({task.model.task}), "
            f"strategy {fed.strategy}, {clients}{fed.num_rounds} rounds of {work}, "
            f"LoRA rank {task.lora.lora_rank}",
            f"privacy: DP-SGD {dp_sgd}; client-level DP {client_dp}; payloads "
            f"{'encrypted' if fed.encrypt_payloads else 'in clear'}; secure aggregation "
            f"{'on' if self.secure.secure_aggregation else 'off'}",
            f"results: {fed.results_dir}",
        ]

    @staticmethod
    def keys() -> set[str]:
        """Every run-config key (the federation's, the task's, every strategy's)."""
        return (settings_keys(FederationSettings) | settings_keys(RobustConfig)
                | settings_keys(SecureAggregationConfig)
                | TaskSettings.keys() | strategy_keys())

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved settings as a flat run config (the chosen strategy's keys only)."""
        flat = to_run_config(self.federation)
        flat.update(to_run_config(self.robust))
        flat.update(to_run_config(self.secure))
        flat.update(self.strategy.to_run_config())
        flat.update(self.task.to_dict())
        return dict(sorted(flat.items()))
