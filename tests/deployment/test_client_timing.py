"""The ClientApp's start-up figures (``setup-seconds``, ``process-age-seconds``), in-process.

What the multinode test measures in a deployment (a fresh process per message, so
setup is paid every round) is contrasted here with a long-lived process (a simulation
actor): the second message reuses the cached runtime and its setup is a small fraction.
"""

import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import process_age, train
from strategies.codec import state_to_record
from strategies.instructions import ClientInstructions
from task import runtime as runtime_module
from task.runtime import cached_runtime
from task.settings import TaskSettings
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.usefixtures("task_identity")


def _message(config, server_round):
    settings = TaskSettings.from_run_config(config)
    adapter = cached_runtime(settings).initial_adapter
    instructions = ClientInstructions(server_round=server_round, strategy="fedit",
                                      rank=settings.lora.lora_rank,
                                      alpha=settings.lora.lora_alpha)
    content = RecordDict({"arrays": state_to_record(adapter.to_state_dict()),
                          "config": ConfigRecord(instructions.to_config())})
    return Message(content=content, message_type="train", dst_node_id=5)


def _context(config):
    return Context(run_id=42, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                   state=RecordDict(), run_config=config)


def test_setup_is_paid_once_per_process(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{"max-length": 20})
    first_message, second_message = _message(config, 1), _message(config, 2)
    runtime_module._CACHE.clear()  # the first message finds nothing built, like a new process
    started = time.monotonic()
    first = train(first_message, _context(config)).content["metrics"]
    elapsed = time.monotonic() - started
    second = train(second_message, _context(config)).content["metrics"]

    assert 0 < first["setup-seconds"] < elapsed
    assert first["setup-seconds"] + first["train-seconds"] <= elapsed
    assert second["setup-seconds"] < first["setup-seconds"] / 2  # the runtime was reused
    for metrics in (first, second):
        assert metrics["process-age-seconds"] >= metrics["setup-seconds"]
    assert second["process-age-seconds"] > first["process-age-seconds"]  # the same process


def test_process_age_is_this_processes_age():
    import psutil

    age = process_age()
    assert age is not None
    assert age == pytest.approx(time.time() - psutil.Process().create_time(), abs=1.0)
