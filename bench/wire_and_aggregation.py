"""Bytes on the wire vs raw adapter bytes, and FedIT aggregation cost vs decoding cost.

Side by side in one run, for the embedded default's adapter (MiniLM-L6, r=8 on query
and value, 5-class head) and for LLaMA-7B-shaped q/v adapters (32 layers, 4096, r=16):

- ``wire_overhead``: serialized size of Flower's ArrayRecord (every object Flower sends,
  arrays chunked) / raw float32 bytes of the adapter;
- ``aggregate_vs_decode``: time of the FedIT average of N client adapters / time to
  validate and decode those N updates (what the server does anyway).

Usage: python bench/wire_and_aggregation.py [--json] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flwr.app import MetricRecord, RecordDict

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.codec import adapter_to_record
from strategies.fedit import fedit_aggregate
from strategies.validation import UpdateSpec, validate_update

SHAPES = {
    "minilm-r8": dict(layers=6, modules=("query", "value"), width=384, rank=8, head=(5, 384)),
    "llama7b-r16": dict(layers=32, modules=("q_proj", "v_proj"), width=4096, rank=16, head=None),
}


def make_adapter(rng: np.random.Generator, layers: int, modules: tuple[str, ...], width: int,
                 rank: int, head: tuple[int, int] | None) -> LoraAdapter:
    factors = {
        f"base_model.model.layers.{i}.{m}": LoraFactors(
            A=rng.standard_normal((rank, width), dtype=np.float32),
            B=rng.standard_normal((width, rank), dtype=np.float32))
        for i in range(layers) for m in modules
    }
    extras = {"base_model.model.classifier.weight": rng.standard_normal(head, dtype=np.float32)}
    return LoraAdapter(factors, alpha=2.0 * rank, extras=extras if head else {})


def serialized_bytes(obj) -> int:
    """Bytes of an inflatable Flower object and all its children, as Flower sends them."""
    children = obj.children or {}
    return len(obj.deflate()) + sum(serialized_bytes(c) for c in children.values())


def measure(name: str, clients: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    adapters = [make_adapter(rng, **SHAPES[name]) for _ in range(clients)]
    records = [adapter_to_record(a) for a in adapters]
    spec = UpdateSpec.matching(adapters[0], max_num_examples=10**6)
    raw = adapters[0].nbytes()
    wire = serialized_bytes(records[0])
    replies = [RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": 100})})
               for r in records]
    start = time.perf_counter()
    decoded = [LoraAdapter.from_state_dict(validate_update(c, spec, node_id=i).state, 16.0)
               for i, c in enumerate(replies)]
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    fedit_aggregate(decoded, [100] * clients)
    aggregate_s = time.perf_counter() - start
    return {"raw_bytes": raw, "wire_bytes": wire, "wire_overhead": wire / raw,
            "decode_s": decode_s, "aggregate_s": aggregate_s,
            "aggregate_vs_decode": aggregate_s / decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    results = {name: measure(name, args.clients) for name in SHAPES}
    if args.json:
        print(json.dumps({"clients": args.clients, **results,
                          "wire_overhead": results["minilm-r8"]["wire_overhead"]}))
        return
    print(f"{'adapter':<14}{'raw MB':>9}{'wire MB':>9}{'overhead':>10}"
          f"{'decode s':>10}{'FedIT s':>9}{'FedIT/decode':>14}   ({args.clients} clients)")
    for name, r in results.items():
        print(f"{name:<14}{r['raw_bytes'] / 1e6:>9.3f}{r['wire_bytes'] / 1e6:>9.3f}"
              f"{r['wire_overhead']:>10.4f}{r['decode_s']:>10.3f}{r['aggregate_s']:>9.3f}"
              f"{r['aggregate_vs_decode']:>14.2f}")


if __name__ == "__main__":
    main()
