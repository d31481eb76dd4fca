"""Simulated malicious clients, for the ``robustness`` experiment and the tests.

The attack lives here, in the simulation path, never in :mod:`client`: a deployed
ClientApp has no switch a server could turn on. :func:`make_attack_client_app` wraps the
ordinary fedlora ClientApp; nodes whose partition id is in ``attack.attackers`` misbehave
in every round, the others are the ordinary app, untouched. Attacks:

- ``silent``: no update at all (an error reply): the reference for "the attackers' data
  is lost", which is what rejecting every attacker's update costs;
- ``scaled``: the honest change multiplied by ``scale`` (default 100): sends
  ``sent + scale * (trained - sent)``;
- ``sign-flip``: the change negated (and multiplied by ``scale``, default 1);
- ``noise``: the change replaced by Gaussian noise whose L2 norm is ``scale`` (default 1)
  times the honest change's, so a norm bound alone cannot tell it apart;
- ``label-flip``: honest training on labels shifted by one class (``y -> (y + 1) mod C``,
  a permutation without fixed points).

``sent`` is what the node received (its leading block, for a node that pruned its rank).
The tampering works on plaintext replies: attacked runs need ``encrypt-payloads=false``
(the simulation's default).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

NONE, SILENT, SCALED, SIGN_FLIP, NOISE, LABEL_FLIP = (
    "none", "silent", "scaled", "sign-flip", "noise", "label-flip")
ATTACKS = (NONE, SILENT, SCALED, SIGN_FLIP, NOISE, LABEL_FLIP)
DEFAULT_SCALE = {SCALED: 100.0, SIGN_FLIP: 1.0, NOISE: 1.0}
#: run-config keys only the attacked simulation reads (removed before the run's settings)
ATTACK_KEYS = ("attack", "attack-clients", "attack-scale")
SILENT_ERROR_CODE = 4998
ARRAYS, METRICS = "arrays", "metrics"


@dataclass(frozen=True)
class Attack:
    """Which simulated partitions attack, and how.

    Attributes:
        kind: one of :data:`ATTACKS`.
        attackers: the partition ids that attack.
        scale: the attack's multiplier (see the module docstring); 0 = its default.
        seed: seeds the ``noise`` attack (with the round and the partition).

    Raises:
        ValueError: an unknown attack, a negative scale or partition id, naming the key.

    """

    kind: str = NONE
    attackers: frozenset[int] = frozenset()
    scale: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got '{self.kind}'")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"attack-scale must be a finite number >= 0 (0 = the attack's "
                             f"default), got {self.scale}")
        if any(p < 0 for p in self.attackers):
            raise ValueError(f"attack-clients must be partition ids >= 0, got "
                             f"{sorted(self.attackers)}")

    @property
    def multiplier(self) -> float:
        """``scale``, or the attack's default when it is 0."""
        return self.scale or DEFAULT_SCALE.get(self.kind, 1.0)

    def attacks(self, partition_id: int) -> bool:
        """Whether the node of ``partition_id`` attacks."""
        return self.kind != NONE and partition_id in self.attackers

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> tuple[Attack, dict[str, Any]]:
        """The attack in a run config's :data:`ATTACK_KEYS`, and the config without them.

        ``attack-clients`` is a comma-separated list of partition ids (``"0,1"``).
        """
        rest = {k: v for k, v in config.items() if k not in ATTACK_KEYS}
        clients = str(config.get("attack-clients", "")).strip()
        try:
            attackers = frozenset(int(p) for p in clients.split(",") if p.strip())
        except ValueError:
            raise ValueError(f"attack-clients must be comma-separated partition ids, got "
                             f"'{clients}'") from None
        attack = cls(kind=str(config.get("attack", NONE)), attackers=attackers,
                     scale=float(config.get("attack-scale", 0.0)),
                     seed=int(config.get("seed", 0)))
        return attack, rest


def tamper(state: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], attack: Attack,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What an attacker sends instead of ``state`` (its honest result), for the array attacks.

    Each tensor's change is taken against the leading block of what was sent (a node that
    pruned its rank sends smaller factors). Values keep their dtype.
    """
    base = {k: sent[k][tuple(slice(0, s) for s in v.shape)].astype(np.float64)
            for k, v in state.items()}
    change = {k: v.astype(np.float64) - base[k] for k, v in state.items()}
    factor = attack.multiplier
    if attack.kind == SCALED:
        change = {k: factor * c for k, c in change.items()}
    elif attack.kind == SIGN_FLIP:
        change = {k: -factor * c for k, c in change.items()}
    elif attack.kind == NOISE:
        norm = math.sqrt(sum(float(np.sum(c * c)) for c in change.values()))
        noise = {k: rng.standard_normal(c.shape) for k, c in change.items()}
        noise_norm = math.sqrt(sum(float(np.sum(n * n)) for n in noise.values())) or 1.0
        change = {k: n * (factor * norm / noise_norm) for k, n in noise.items()}
    else:
        raise ValueError(f"attack '{attack.kind}' does not tamper with the arrays")
    return {k: (base[k] + change[k]).astype(v.dtype) for k, v in state.items()}


@contextlib.contextmanager
def flipped_labels(context: Context, overrides: Mapping[str, Any]) -> Iterator[None]:
    """While open, this process's runtime hands out partitions with labels shifted by one.

    The runtime is the one the ClientApp's handler gets (:func:`task.runtime.cached_runtime`
    of the same settings); its ``encoded_partition`` is shadowed on the instance and
    restored on exit (a Flower simulation actor runs one message at a time).
    """
    from client.app import run_settings
    from task.runtime import cached_runtime
    from task.training import Encoded

    settings = run_settings(context, overrides).task
    runtime = cached_runtime(settings)
    original = runtime.encoded_partition
    classes = runtime.data.num_labels

    def encoded_partition(partition_id: int, num_partitions: int) -> Encoded:
        data = original(partition_id, num_partitions)
        if data.labels is None:
            raise ValueError("label-flip needs a classification task (labels)")
        return Encoded(data.input_ids, [(int(y) + 1) % classes for y in data.labels])

    runtime.encoded_partition = encoded_partition  # type: ignore[method-assign]
    try:
        yield
    finally:
        del runtime.encoded_partition


def _attacked_reply(reply: Message, message: Message, attack: Attack, server_round: int,
                    partition_id: int) -> Message:
    """``reply`` with its arrays tampered (metrics and the rest unchanged)."""
    sent = {k: a.numpy() for k, a in message.content[ARRAYS].items()}
    state = {k: a.numpy() for k, a in reply.content[ARRAYS].items()}
    rng = np.random.default_rng([attack.seed, server_round, partition_id])
    arrays = ArrayRecord()
    for key, value in tamper(state, sent, attack, rng).items():
        arrays[key] = Array(np.ascontiguousarray(value))
    content = RecordDict({ARRAYS: arrays, METRICS: reply.content.metric_records[METRICS]})
    return Message(content, reply_to=message)


def make_attack_client_app(client_app: ClientApp, overrides: Mapping[str, Any],
                           attack: Attack) -> ClientApp:
    """``client_app`` (the ordinary fedlora ClientApp), with the partitions in ``attack`` attacking.

    Every message goes through ``client_app`` itself (its mods included); an attacker's
    train reply is then tampered with, or replaced by an error (``silent``), or produced
    while its runtime serves flipped labels (``label-flip``).
    """
    overrides = dict(overrides)
    app = ClientApp()

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        from client.partition import node_partition

        partition_id, _ = node_partition(context.node_config)
        if not attack.attacks(partition_id):
            return client_app(message, context)
        server_round = int(message.content["config"]["server-round"])
        if attack.kind == SILENT:
            return Message(Error(code=SILENT_ERROR_CODE, reason=f"attacker (partition "
                                 f"{partition_id}) sends nothing"), reply_to=message)
        if attack.kind == LABEL_FLIP:
            with flipped_labels(context, overrides):
                return client_app(message, context)
        reply = client_app(message, context)
        if reply.has_error():
            return reply
        return _attacked_reply(reply, message, attack, server_round, partition_id)

    @app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return client_app(message, context)

    @app.query("fedlora_handshake")
    def _handshake(message: Message, context: Context) -> Message:
        return client_app(message, context)

    return app


def simulate_attacked(
    run_config: Mapping[str, Any],
    *,
    num_clients: int,
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
) -> list[dict[str, Any]]:
    """:func:`simulations.simulate.simulate` with the attack in the run config's attack keys.

    ``attack``, ``attack-clients`` and ``attack-scale`` (:class:`Attack`) are taken out of
    the run config; the rest are the run's settings, validated before anything starts.

    Raises:
        ValueError: a bad setting or attack, or ``encrypt-payloads=true`` with an attack
            (replies are tampered with in plaintext).
        RuntimeError: the run ended without writing its final metrics.

    """
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from simulations import simulate as sim
    from task.run_settings import RunSettings

    attack, config = Attack.from_run_config(run_config)
    config = {"encrypt-payloads": False, **config}
    settings = RunSettings.from_run_config(config)
    if attack.kind != NONE and settings.federation.encrypt_payloads:
        raise ValueError("an attacked simulation needs encrypt-payloads=false: the attackers "
                         "tamper with plaintext replies")
    if num_clients < settings.federation.min_train_nodes:
        raise ValueError(f"num-clients {num_clients} is below min-train-nodes "
                         f"{settings.federation.min_train_nodes}")
    outside = sorted(p for p in attack.attackers if p >= num_clients)
    if attack.kind != NONE and outside:
        raise ValueError(f"attack-clients {outside} are not partitions of {num_clients} clients")
    overrides = settings.to_dict()
    node_config = getattr(sim, "simulation_node_config", None)
    inner = make_client_app(overrides, **(
        {"node_overrides": node_config(settings)} if node_config is not None else {}))
    metrics_path = Path(settings.federation.results_dir) / "metrics.json"
    metrics_path.unlink(missing_ok=True)
    gpus = (sim.default_gpus_per_client(num_clients) if gpus_per_client is None
            else gpus_per_client)
    try:
        run_simulation(
            server_app=make_server_app(settings=settings),
            client_app=make_attack_client_app(inner, overrides, attack),
            num_supernodes=num_clients,
            backend_config=sim.backend_config(cpus_per_client, gpus),  # type: ignore[arg-type]
        )
    finally:
        sim._shutdown_ray()
    if not metrics_path.exists():
        raise RuntimeError(f"the simulation wrote no metrics to {metrics_path}; see the log above")
    records: list[dict[str, Any]] = json.loads(metrics_path.read_text())
    if not records or records[-1]["round"] != settings.federation.num_rounds:
        raise RuntimeError(f"the simulation stopped before its last round; see {metrics_path}")
    return records
