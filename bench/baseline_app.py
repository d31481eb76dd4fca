"""A baseline Flower app in the style of Flower's FlowerTune LLM examples.

The reference point for ``bench/federation_overhead.py``: the orchestration of
``examples/flowertune-llm`` (Flower's message API), written small, with fedlora's own task
functions (``task/model.py``, ``task/data.py``, ``task/training.py``) so that the compute
is identical to fedlora's and only the orchestration differs:

- ClientApp train handler: every call builds the tokenizer, the base model
  (``from_pretrained``) with a fresh peft LoRA adapter, and the tokenized partition;
  loads the received LoRA state dict (``set_peft_model_state_dict``), trains with a plain
  loop (``task.training.train_local``) and replies with ``get_peft_model_state_dict`` as
  an ``ArrayRecord``. Like FlowerTune's ``dataset.py`` (a module-level
  ``FederatedDataset``), the raw corpus is read once per process; partitioning and
  tokenizing happen in every call.
- ServerApp: Flower's ``FedAvg`` (``flwr.serverapp.strategy``) started from the same
  initial adapter; its ``evaluate_fn`` rebuilds model and tokenizer and evaluates on the
  full held-out split every round (FlowerTune rebuilds the model in ``evaluate_fn`` too).

Same seeds as fedlora (initial adapter, per-round data order and dropout), so both runs
train the same adapter; FedAvg on the LoRA factors is what fedlora's FedIT computes.
The train reply's metrics carry ``train-seconds`` (inside the training loop) and
``setup-seconds`` (from the handler's start until training starts), as fedlora's do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from client.app import round_seed  # fedlora's per-round seed: the same data order and dropout
from task.data import TaskData, load_partition, load_task_data
from task.model import attach_lora, autocast_dtype, load_base_model, load_tokenizer, select_device
from task.settings import TaskSettings
from task.training import encode, evaluate, train_local

if TYPE_CHECKING:
    from peft import PeftModel

EvalCallback = Callable[[dict[str, Any]], None]

_RAW: dict[Any, TaskData] = {}  # FlowerTune's `FDS` cache: the raw corpus, once per process


def load_raw(settings: TaskSettings) -> TaskData:
    """The raw train pool and held-out split (read once per process)."""
    key = (settings.data, settings.model.task)
    if key not in _RAW:
        _RAW.clear()
        _RAW[key] = load_task_data(settings.data, settings.model.task)
    return _RAW[key]


def get_model(settings: TaskSettings, num_labels: int) -> PeftModel:
    """Base model from its weights with a fresh LoRA adapter (FlowerTune's ``get_model``)."""
    seed = settings.train.seed
    base = load_base_model(settings.model, num_labels=num_labels, seed=seed)
    model = attach_lora(base, settings.lora, settings.model.task, seed=seed)
    model.to(select_device(settings.model.device))
    return model


def lora_record(model: PeftModel) -> ArrayRecord:
    """The adapter (LoRA factors and the trained head) as an ``ArrayRecord``."""
    from peft import get_peft_model_state_dict

    return ArrayRecord({k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()})


def train(message: Message, context: Context, settings: TaskSettings) -> Message:
    """FlowerTune-style train handler: build everything, load, train, reply."""
    started = time.perf_counter()  # setup includes the imports, as fedlora's handler time does
    import torch
    from peft import set_peft_model_state_dict

    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data = load_raw(settings)
    tokenizer = load_tokenizer(settings.model)
    partition = load_partition(data.train, settings.data, partition_id=partition_id,
                               num_partitions=num_partitions, task=settings.model.task)
    trainset = encode(partition, tokenizer, settings.data.max_length, settings.model.task)
    model = get_model(settings, data.num_labels)
    set_peft_model_state_dict(model, message.content.array_records["arrays"].to_torch_state_dict())
    device = select_device(settings.model.device)
    server_round = cast(int, message.content.config_records["config"]["server-round"])
    seed = round_seed(settings, server_round, partition_id)
    setup_seconds = time.perf_counter() - started
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = train_local(model, tokenizer, trainset, settings.train, device=device,
                             autocast=autocast_dtype(settings.model.precision, device),
                             seed=seed)
    metrics = MetricRecord({
        "train-loss": result.loss_mean,
        "num-examples": result.num_examples,
        "train-seconds": result.seconds,
        "setup-seconds": setup_seconds,
    })
    content = RecordDict({"arrays": lora_record(model), "metrics": metrics})
    return Message(content=content, reply_to=message)


def make_client_app(settings: TaskSettings) -> ClientApp:
    """The baseline ClientApp (train only; federated evaluation is off in the comparison)."""
    app = ClientApp()

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        return train(message, context, settings)

    return app


def get_evaluate_fn(
    settings: TaskSettings, on_evaluate: EvalCallback | None = None
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Evaluate the global adapter on the full held-out split, rebuilding the model each time."""

    def _evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from peft import set_peft_model_state_dict

        started = time.perf_counter()
        data = load_raw(settings)
        tokenizer = load_tokenizer(settings.model)
        model = get_model(settings, data.num_labels)
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        test = encode(data.test, tokenizer, settings.data.max_length, settings.model.task)
        device = select_device(settings.model.device)
        scores = evaluate(model, tokenizer, test, batch_size=64, device=device,
                          autocast=autocast_dtype(settings.model.precision, device))
        if on_evaluate is not None:
            on_evaluate({"round": server_round, "seconds": time.perf_counter() - started,
                         "examples": len(test), **scores})
        return MetricRecord(cast(dict[str, Any], scores))

    return _evaluate


def make_server_app(
    settings: TaskSettings, *, num_rounds: int, on_evaluate: EvalCallback | None = None
) -> ServerApp:
    """The baseline ServerApp: Flower's FedAvg, server-side evaluation every round."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        init = get_model(settings, load_raw(settings).num_labels)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_train_nodes=2, min_available_nodes=2)
        strategy.start(grid=grid, initial_arrays=lora_record(init), num_rounds=num_rounds,
                       train_config=ConfigRecord(),
                       evaluate_fn=get_evaluate_fn(settings, on_evaluate))

    return app
