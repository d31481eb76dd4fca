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
from strategies.config import ConfigError, check, from_run_config, settings_keys, to_run_config
from strategies.messaging import check_sampling
from strategies.registry import strategy_config, strategy_keys
from strategies.robust import MEAN, RobustConfig
from task.settings import DEFAULT_NUM_ROUNDS, TaskSettings

if TYPE_CHECKING:
    import torch


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
    The robust-aggregation settings are :class:`strategies.robust.RobustConfig`'s, a part
    of :class:`RunSettings` of their own.
    """

    strategy: str = "fedit"
    num_rounds: int = DEFAULT_NUM_ROUNDS
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    fraction_evaluate: float = 0.0
    min_reply_fraction: float = 0.0
    round_timeout: float = 3600.0
    max_num_examples: int = 1_000_000
    seed: int = 0
    results_dir: str = "results/latest"
    eval_every: int = 1
    eval_subset: int = 0
    eval_batch_size: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    encrypt_payloads: bool = True
    server_key_file: str = ""
    client_keys_file: str = ""
    client_dp_noise: float = 0.0
    client_dp_clip: float = 1.0
    client_dp_delta: float = 1e-5
    client_dp_secure_seed: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.num_rounds >= 1, f"num-rounds must be at least 1, got {self.num_rounds}"),
            (self.round_timeout > 0, f"round-timeout must be positive, got {self.round_timeout}"),
            (self.eval_every >= 1, f"eval-every must be at least 1, got {self.eval_every}"),
            (self.eval_subset >= 0, f"eval-subset must not be negative, got {self.eval_subset}"),
            (self.eval_batch_size >= 0,
             f"eval-batch-size must not be negative, got {self.eval_batch_size} (0 = auto)"),
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
        check_sampling(fraction_train=self.fraction_train, min_train_nodes=self.min_train_nodes,
                       fraction_evaluate=self.fraction_evaluate,
                       min_reply_fraction=self.min_reply_fraction,
                       max_num_examples=self.max_num_examples)
        get_strategy_class(self.strategy)  # an unknown name fails here, listing them

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
