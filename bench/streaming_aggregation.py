"""Server memory of one round against the number of clients: streaming vs collecting.

One FedIT round on an adapter the size of LLaMA-7B's (q and v LoRA at rank 16 in 32
layers: 64 modules of 4096 x 16, about 33.6 MB per update). Replies arrive one at a
time from a generator, as ``server.replies.stream_replies`` yields them from the grid;
each is built only when pulled, like a message arriving off the wire.

- streaming: ``LoraStrategy.aggregate_train`` folds each reply into a running sum and
  drops it (fedlora's path with ``update-norm-bound=0``, ``update-min-cosine=-1`` and
  ``aggregator=mean``);
- bounded: the defaults (``update-norm-bound=10``, ``update-min-cosine=0``): the strategy
  holds the round's decoded updates until all are in, because the screens are relative to
  the round's median change (the replies themselves are still dropped as they arrive);
- collecting: the replies are first gathered into a list (what ``Grid.send_and_receive``
  returns) and then aggregated.

Peak memory is Python's ``tracemalloc`` peak (numpy buffers included) during the round,
on top of what is allocated before it. Run with 5 and 50 clients; the JSON object has
``streaming_peak_ratio`` (peak at 50 clients / peak at 5; flat is 1.0) and the same for
bounded and collecting.

    python bench/streaming_aggregation.py [--json] [--clients 5,50] [--layers 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.codec import adapter_to_record
from strategies.fedit import FedIT

HIDDEN, RANK = 4096, 16


class FakeGrid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def global_adapter(layers: int) -> LoraAdapter:
    rng = np.random.default_rng(0)
    modules = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            modules[name] = LoraFactors(
                A=(rng.standard_normal((RANK, HIDDEN)) * 0.01).astype(np.float32),
                B=np.zeros((HIDDEN, RANK), np.float32))
    return LoraAdapter(modules=modules, alpha=32.0)


def replies(messages: list[Message], seed: int) -> Iterator[Message]:
    """Each node's reply, made only when pulled (the arrays it received, nudged the same
    way by a node-drawn amount, so the round's screens accept every reply)."""
    for message in messages:
        rng = np.random.default_rng(seed + message.metadata.dst_node_id)
        record = ArrayRecord()
        for key, array in message.content["arrays"].items():
            value = array.numpy()
            record[key] = Array(value + np.float32(1.0 + rng.random()) * 1e-3)
        content = RecordDict({"arrays": record, "metrics": MetricRecord(
            {"num-examples": 100 + message.metadata.dst_node_id, "train-loss": 1.0})})
        yield Message(content, reply_to=message)


def one_round(clients: int, layers: int, collect: bool, bound: float = 0.0) -> dict[str, float]:
    """Peak memory and time of configure + aggregate for one round of ``clients``.

    ``bound``: the strategy's ``update-norm-bound`` (0 = off, with the direction screen
    off too: the streaming path).
    """
    strategy = FedIT(lora_alpha=32.0, min_train_nodes=clients, min_available_nodes=clients,
                     update_norm_bound=bound, update_min_cosine=0.0 if bound else -1.0)
    strategy.error_metric_max_bytes = 0  # the metric keeps factors; measured without it
    arrays = adapter_to_record(global_adapter(layers))
    gc.collect()
    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    started = time.perf_counter()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(clients)))
    stream = replies(messages, seed=7)
    if collect:
        stream = iter(list(stream))
    new_arrays, _ = strategy.aggregate_train(1, stream)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert new_arrays is not None and strategy.history[1].accepted == clients
    return {"peak_mb": (peak - baseline) / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="5,50", help="client counts, comma-separated")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # outside an app
    counts = [int(c) for c in args.clients.split(",")]
    update_mb = args.layers * 2 * 2 * HIDDEN * RANK * 4 / 2**20
    rows = {}
    for path, collect, bound in (("streaming", False, 0.0), ("bounded", False, 10.0),
                                 ("collecting", True, 0.0)):
        rows[path] = {n: one_round(n, args.layers, collect, bound) for n in counts}
    low, high = min(counts), max(counts)
    out = {
        "update_mb": update_mb,
        "clients": counts,
        "rounds": rows,
        "streaming_peak_ratio": rows["streaming"][high]["peak_mb"]
        / rows["streaming"][low]["peak_mb"],
        "bounded_peak_ratio": rows["bounded"][high]["peak_mb"]
        / rows["bounded"][low]["peak_mb"],
        "collecting_peak_ratio": rows["collecting"][high]["peak_mb"]
        / rows["collecting"][low]["peak_mb"],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"one FedIT round, adapter {update_mb:.1f} MB per update "
          f"({args.layers} layers x q,v x rank {RANK} at {HIDDEN})")
    print(f"{'path':<12}{'clients':>8}{'peak MB':>10}{'seconds':>9}")
    for path, by_count in rows.items():
        for n, row in by_count.items():
            print(f"{path:<12}{n:>8}{row['peak_mb']:>10.1f}{row['seconds']:>9.2f}")
    print(f"peak at {high} / peak at {low} clients: streaming "
          f"{out['streaming_peak_ratio']:.3f}, bounded {out['bounded_peak_ratio']:.3f}, "
          f"collecting {out['collecting_peak_ratio']:.3f}")


if __name__ == "__main__":
    main()
