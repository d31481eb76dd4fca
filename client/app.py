"""The fedlora ClientApp: receive the global adapter, train it locally, send it back.

The base model, tokenizer and tokenized partition are built once per process and
reused (see :mod:`task.runtime`); the adapter, optimizer and data order are reset
from each message, so a reused client returns exactly what a fresh one would. The
reuse pays off in simulations (long-lived actors); a Flower 1.42 SuperNode starts a
fresh ``flwr-clientapp`` process for every message, so a deployed client rebuilds
everything each round (the ``setup-seconds`` train metric shows the cost).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from client.dp import BudgetRefused, data_identity, ledger_path, train_private
from client.partition import node_partition
from client.policy import NodePolicy, PolicyRefused
from client.private_state import load_private, store_private
from client.ranks import fit_rank
from privacy.flower import handshake
from privacy.secagg_flower import answer_query, secure_aggregation_mod
from privacy.transports import client_mods
from strategies import get_strategy_class
from strategies.adapter import LoraAdapter
from strategies.codec import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, state_to_record
from strategies.config import convert
from strategies.errors import BUDGET_REFUSAL_CODE
from strategies.instructions import ClientInstructions
from strategies.parts import ADAPTER_PARTS, select_parts
from strategies.sparse import is_base_key
from task.run_settings import RunSettings
from task.settings import TaskSettings
from task.tasks.base import DATA_LOG, DATA_WARNINGS_KEY

if TYPE_CHECKING:
    from task.runtime import TaskRuntime

BUDGET_ERROR_CODE = BUDGET_REFUSAL_CODE  # refusing a round past its privacy budget
POLICY_ERROR_CODE = 4002  # a client refusing instructions or DP terms outside its node policy


_SETTINGS: dict[tuple[tuple[str, Any], ...], RunSettings] = {}
_SETTINGS_LOCK = threading.Lock()


def run_settings(context: Context, overrides: Mapping[str, Any] | None = None) -> RunSettings:
    """The run's settings, parsed once per process (and per distinct run config).

    The client reads the same :class:`task.run_settings.RunSettings` as the server, so
    both take their defaults (``num-rounds``, the strategy's settings) from one place.
    """
    config = {**context.run_config, **(overrides or {})}
    key = tuple(sorted(config.items()))
    with _SETTINGS_LOCK:
        if key not in _SETTINGS:
            if len(_SETTINGS) > 8:  # a long-lived process serving many runs
                _SETTINGS.clear()
            _SETTINGS[key] = RunSettings.from_run_config(config)
        return _SETTINGS[key]


def quiet_data_warnings(context: Context) -> None:
    """Silence the data's warnings on a node whose config says so (a simulated node).

    In a simulation the server loads the same data first and says what it left out;
    without this, every client actor said it again.
    """
    if not convert(DATA_WARNINGS_KEY, context.node_config.get(DATA_WARNINGS_KEY, True),
                   "bool"):
        DATA_LOG.setLevel(logging.ERROR)


def round_seed(settings: TaskSettings, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per run, round and client (data order, dropout).

    The server knows all three, so this never seeds a privacy mechanism: DP-SGD's noise
    and Poisson sampling come from OS entropy unless the run says ``dp-reproducible``.
    """
    return settings.train.seed * 1_000_003 + server_round * 1_009 + partition_id


def refusal(message: Message, code: int, exc: Exception, *, action: str = "train") -> Message:
    """An error reply that says why the node refuses (the server leaves it out)."""
    log(WARNING, "fedlora client: refused to %s: %s", action, exc)
    return Message(Error(code=code, reason=f"refused to {action}: {exc}"), reply_to=message)


def process_age() -> float | None:
    """Seconds since this process started (None when psutil cannot tell).

    In a deployment Flower 1.42 starts a fresh ``flwr-clientapp`` process for every
    message, so at the start of training this is the whole per-message start-up cost;
    in a simulation the process is long-lived and it grows from round to round.
    """
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # noqa: BLE001 - a timing figure is never worth failing a round
        return None


def prepare_adapter(
    runtime: TaskRuntime, received: ArrayRecord, instructions: ClientInstructions,
    context: Context,
) -> None:
    """Activate the instructed adapter and load it.

    The adapter starts from its fresh init, overwritten by what was received, overwritten
    by this client's private parts from earlier rounds.
    """
    runtime.activate(instructions.rank, instructions.alpha)
    state = runtime.initial().to_state_dict()
    incoming = fit_rank({key: array.numpy() for key, array in received.items()},
                        instructions.rank)
    unexpected = sorted(k for k in set(incoming) - set(state) if not is_base_key(k))
    if unexpected:
        raise ValueError(f"received adapter keys this model does not have: {unexpected[:3]}")
    state.update(incoming)
    if instructions.private_parts:
        state.update(select_parts(load_private(context, instructions.rank),
                                  instructions.private_parts))
    runtime.set_adapter(LoraAdapter.from_state_dict(state, instructions.alpha))


def train(
    message: Message, context: Context, overrides: Mapping[str, Any] | None = None
) -> Message:
    """Handle a train message: load the sent adapter, train locally, reply with the result.

    The node's policy (:mod:`client.policy`, from its node config) bounds what the
    instructions and the run config may ask; outside it the node replies with an error
    that says why and trains nothing. Only the parts the instructions name are trained
    and sent back; private parts are stored in ``context.state`` and never put in the
    reply. With DP the noise and sampling come from OS entropy (unless the run says
    ``dp-reproducible`` and the node allows it), and the ledger is kept on disk by
    default (:mod:`client.dp`). The reply's metrics include ``setup-seconds``, the time
    from this handler's start to the start of training (imports, building or reusing
    the cached runtime, encoding data, loading the adapter), and
    ``process-age-seconds``, the process's age when training starts; they carry no
    partition id.
    """
    received = time.monotonic()
    import torch

    from task.runtime import cached_runtime
    from task.training import train_local

    run = run_settings(context, overrides)
    settings = run.task
    quiet_data_warnings(context)
    partition_id, num_partitions = node_partition(context.node_config)
    policy = NodePolicy.from_node_config(context.node_config)
    num_rounds = run.federation.num_rounds
    try:
        instructions = policy.bound_instructions(
            ClientInstructions.from_config(message.content[CONFIG_KEY]))
        hooks = get_strategy_class(instructions.strategy).client_hooks
        policy.check_rounds(num_rounds=num_rounds, server_round=instructions.server_round)
        terms = policy.dp_terms(settings.privacy.to_dp(),
                                reproducible=settings.privacy.dp_reproducible)
    except PolicyRefused as exc:
        return refusal(message, POLICY_ERROR_CODE, exc)
    runtime = cached_runtime(settings)
    data = runtime.encoded_partition(partition_id, num_partitions)
    prepare_adapter(runtime, message.content[ARRAYS_KEY], instructions, context)
    runtime.set_trainable(instructions.train_parts)
    hooks.before_training(runtime, instructions)
    seed = round_seed(settings, instructions.server_round, partition_id)
    penalty = hooks.penalty(runtime, instructions)
    setup_seconds = time.monotonic() - received
    age = process_age()
    log(INFO, "fedlora client: round %d, partition %d (pid %d): training starts after "
        "%.2f s of setup (process age %s)", instructions.server_round, partition_id,
        os.getpid(), setup_seconds, "unknown" if age is None else f"{age:.2f} s")
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws from a private, seeded stream
            torch.manual_seed(seed)  # dropout only: not a privacy mechanism (see round_seed)
            if terms is None:
                result = train_local(runtime.model, runtime.tokenizer, data, settings.train,
                                     device=runtime.device, autocast=runtime.autocast,
                                     seed=seed, penalty=penalty)
            else:
                if terms.reproducible:
                    log(WARNING, "fedlora client: dp-reproducible=true: the DP noise is "
                        "seeded from the run seed; NOT private against the server")
                identity = data_identity(dataset=settings.data.dataset,
                                         partition_id=partition_id,
                                         num_partitions=num_partitions)
                result = train_private(
                    runtime, data, settings.train, terms=terms, policy=policy,
                    context=context, seed=seed if terms.reproducible else None,
                    ledger_file=ledger_path(policy, dataset=settings.data.dataset,
                                            partition_id=partition_id,
                                            num_partitions=num_partitions),
                    identity=identity, num_rounds=num_rounds, penalty=penalty)
    except BudgetRefused as exc:  # refuse, say why; the server leaves us out
        return refusal(message, BUDGET_ERROR_CODE, exc)
    except PolicyRefused as exc:
        return refusal(message, POLICY_ERROR_CODE, exc)
    finally:
        runtime.set_trainable(ADAPTER_PARTS)
    log(INFO, "fedlora client: round %d, partition %d (pid %d): %d steps in %.2f s",
        instructions.server_round, partition_id, os.getpid(), result.steps, result.seconds)
    adapter = hooks.after_training(runtime.get_adapter(), instructions)
    trained = adapter.to_state_dict()
    store_private(context, instructions.rank, select_parts(trained, instructions.private_parts))
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "train-loss": result.loss_mean,
        "train-loss-first": result.loss_first,
        "train-loss-last": result.loss_last,
        "steps": result.steps,
        "train-seconds": result.seconds,
        "setup-seconds": setup_seconds,
        **({} if age is None else {"process-age-seconds": age}),
        "rank": adapter.max_rank,
        "dropped-examples": data.dropped,
        **(result.metrics() if hasattr(result, "metrics") else {}),
    })
    outgoing = select_parts(trained, instructions.send_parts)
    content = RecordDict({ARRAYS_KEY: state_to_record(outgoing), METRICS_KEY: metrics})
    return Message(content, reply_to=message)


def evaluate(
    message: Message, context: Context, overrides: Mapping[str, Any] | None = None
) -> Message:
    """Handle an evaluate message: score the sent adapter with this client's private parts.

    The client scores on its own held-out share (``local-test-fraction``), or else on its
    shard of the server's held-out split.
    """
    from task.runtime import cached_runtime
    from task.training import auto_eval_batch_size, evaluate_task

    settings = run_settings(context, overrides).task
    quiet_data_warnings(context)
    partition_id, num_partitions = node_partition(context.node_config)
    runtime = cached_runtime(settings)
    try:
        instructions = NodePolicy.from_node_config(context.node_config).bound_instructions(
            ClientInstructions.from_config(message.content[CONFIG_KEY]))
    except PolicyRefused as exc:
        return refusal(message, POLICY_ERROR_CODE, exc, action="evaluate")
    prepare_adapter(runtime, message.content[ARRAYS_KEY], instructions, context)
    data = runtime.encoded_local_test(partition_id, num_partitions)
    if len(data) == 0:  # no local held-out share: this node's shard of the server's split
        shard = runtime.data.test.shard(num_shards=num_partitions, index=partition_id)
        data = runtime.encode(shard)
    scores = evaluate_task(runtime.model, runtime.tokenizer, data,
                           batch_size=auto_eval_batch_size(runtime.device),
                           device=runtime.device, autocast=runtime.autocast,
                           generation=settings.generation).scores
    metrics = MetricRecord({"num-examples": len(data),
                            **{f"eval-{k}": v for k, v in scores.items()}})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


def node_config_mod(node_overrides: Mapping[str, Any]) -> Callable[..., Message]:
    """A ClientApp mod that applies ``node_overrides`` over each node's own node config.

    Flower's simulation engine gives every virtual node only ``partition-id`` and
    ``num-partitions``; this is how a simulation sets what a deployed node would set
    with ``--node-config`` (``require-encryption``, a DP policy, ...). It runs first, so
    every later mod and handler sees the same node config.
    """
    def mod(message: Message, context: Context,
            call_next: Callable[[Message, Context], Message]) -> Message:
        context.node_config.update(node_overrides)
        return call_next(message, context)

    return mod


def make_client_app(overrides: Mapping[str, Any] | None = None,
                    node_overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` are run-config entries applied over the run's own.

    ``node_overrides`` are node-config entries applied over every node's own (see
    :func:`node_config_mod`). Sealed payloads are opened (and replies sealed) by the
    encryption mod; the handshake query gives the server this round's client key.
    """
    mods = [node_config_mod(dict(node_overrides))] if node_overrides else []
    client_app = ClientApp(mods=[*mods, *client_mods(), secure_aggregation_mod])

    @client_app.query("fedlora_handshake")
    def _handshake(message: Message, context: Context) -> Message:
        return handshake(message, context)

    @client_app.query("fedlora_secagg")
    def _secure_aggregation(message: Message, context: Context) -> Message:
        return answer_query(message, context)

    @client_app.train()
    def _train(message: Message, context: Context) -> Message:
        return train(message, context, overrides)

    @client_app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return evaluate(message, context, overrides)

    return client_app


app = make_client_app()
