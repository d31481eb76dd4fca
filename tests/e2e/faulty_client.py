"""A ClientApp that is honest except on chosen partitions, where it corrupts its reply.

``make_faulty_client_app(overrides, faults)`` behaves like :func:`client.app.make_client_app`
for every partition not in ``faults``. A partition in ``faults`` does not train: in round
``r`` it replies with the adapter it received, corrupted by ``faults[partition][r - 1]``:

- ``nan``: a NaN in a LoRA B factor;
- ``wrong-shape``: the classification head with one extra column;
- ``huge-count``: an honest-looking adapter claiming 1e12 examples;
- ``oversize``: a B factor whose payload carries 4 MiB after its valid ``.npy`` bytes;
- ``fail``: no update at all, an error reply (the reference a faulty run is compared to);
- ``crash``: an error reply with the same reason on every node and round (a broken setup).

The handlers are closures, so Ray ships them by value; the helpers they call live in
:mod:`client.app`, which every worker can import.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

FAULTS = ("nan", "wrong-shape", "huge-count", "oversize", "fail", "crash")
FAULT_ERROR_CODE = 4999


def make_faulty_client_app(
    overrides: Mapping[str, Any], faults: Mapping[int, Sequence[str]]
) -> ClientApp:
    """The fedlora ClientApp, with the partitions in ``faults`` misbehaving per round."""
    unknown = sorted({f for per_round in faults.values() for f in per_round} - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {FAULTS}")
    faults = {int(p): tuple(per_round) for p, per_round in faults.items()}
    client_app = ClientApp()

    @client_app.train()
    def _train(message: Message, context: Context) -> Message:
        from client.app import train
        from client.partition import node_partition

        partition_id, _ = node_partition(context.node_config)
        server_round = int(message.content["config"]["server-round"])
        planned = faults.get(partition_id, ())
        if server_round > len(planned):
            return train(message, context, overrides)
        fault = planned[server_round - 1]
        if fault == "crash":
            return Message(Error(code=FAULT_ERROR_CODE, reason="KeyError: 'topic' (injected "
                                 "crash)"), reply_to=message)
        if fault == "fail":
            return Message(Error(code=FAULT_ERROR_CODE, reason=f"injected failure (partition "
                                 f"{partition_id}, round {server_round})"), reply_to=message)
        received = {k: a.numpy() for k, a in message.content["arrays"].items()}
        arrays = ArrayRecord()
        for key, value in received.items():
            arrays[key] = Array(np.ascontiguousarray(value, dtype=np.float32))
        b_key = sorted(k for k in received if k.endswith(".lora_B.weight"))[0]
        head_key = max((k for k in received if ".lora_" not in k),
                       key=lambda k: received[k].size)  # the head's weight, not its bias
        num_examples: float = 50
        if fault == "nan":
            poisoned = received[b_key].astype(np.float32)
            poisoned[0, 0] = np.nan
            arrays[b_key] = Array(poisoned)
        elif fault == "wrong-shape":
            head = received[head_key]
            arrays[head_key] = Array(np.zeros((head.shape[0], head.shape[-1] + 1), np.float32))
        elif fault == "huge-count":
            num_examples = 1e12
        elif fault == "oversize":
            value = received[b_key].astype(np.float32)
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            arrays[b_key] = Array(dtype="float32", shape=value.shape, stype="numpy.ndarray",
                                  data=buffer.getvalue() + bytes(4 * 2**20))
        metrics = MetricRecord({"num-examples": num_examples, "train-loss": 0.0,
                                "partition-id": partition_id})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)

    @client_app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        from client.app import evaluate

        return evaluate(message, context, overrides)

    return client_app
