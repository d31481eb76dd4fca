"""What secure aggregation costs: round wall time, bytes per client, the server's work.

Side by side in one run:

- ``secagg_round_overhead``: the embedded default (MiniLM-L6 on BBC News, FedIT, 4
  clients, ``--rounds`` rounds of the default 20 local steps) through Flower's
  simulation engine, plain and with ``secure-aggregation=true``, one after the other;
  the ratio of the summed round walls (rounds 1 on, each from its sampling to its
  evaluation). Target: at most 1.10.
- ``secagg_bytes_overhead``: bytes per client per round with / without. At 4 clients
  from those two runs (every protocol message counted, both directions); at 10, 50 and
  100 clients from the protocol run among in-process clients (:mod:`privacy.secagg_local`)
  on the embedded default's vector, plus the adapter payloads a plain round sends.
  Target: at most 1.10 at 4 clients.
- ``protocol_ring32``: the server's protocol seconds per stage at 10, 50 and 100
  clients, in process, 10% of the clients dropping after sharing keys (so key recovery
  runs), all in the 32-bit ring; ``server_work_growth``: its growth from 10 to 100
  clients, beside ``n log n`` (``100 ln 100 / (10 ln 10) = 20``) and ``n log^2 n``
  (46x). The unmask stage dominates: one Shamir reconstruction per client from
  ``t = O(log n)`` shares (pycryptodome's Lagrange interpolation, between ``O(t)`` and
  ``O(t^2)`` in practice) and the masks, ``O(n L + dropped x degree x L)``.
- ``hundred_clients``: one secure round with 100 clients in Flower's simulation engine
  (tiny BERT on BBC News, 2 local steps), its clients and seconds per stage.

Usage: python bench/secure_aggregation.py [--json] [--rounds 2] [--sizes 10,50,100]
       [--skip-embedded] [--skip-hundred]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from privacy.secagg_field import TAIL, FieldSpec
from privacy.secagg_local import run_locally
from privacy.secagg_protocol import STAGES, auto_degree, auto_threshold

#: the embedded default's FedIT adapter: 12 modules (A 8x384, B 384x8) and a 5x384 head
MODULES, WIDTH, RANK, HEAD = 12, 384, 8, (5, 384)


def default_adapter_arrays() -> dict[str, np.ndarray]:
    """Arrays of the embedded default's adapter (what FedIT sends down and back up)."""
    arrays = {}
    for m in range(MODULES):
        arrays[f"m{m}.lora_A.weight"] = np.zeros((RANK, WIDTH), np.float32)
        arrays[f"m{m}.lora_B.weight"] = np.zeros((WIDTH, RANK), np.float32)
    arrays["classifier.weight"] = np.zeros(HEAD, np.float32)
    arrays["classifier.bias"] = np.zeros(HEAD[0], np.float32)
    return arrays


def record_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of an ``ArrayRecord`` payload, as the strategies count them."""
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return sum(len(a.data) for a in record.values())


def protocol_costs(clients: int, *, max_weight: int = 1024, dropout: float = 0.1,
                   seed: int = 0) -> dict[str, Any]:
    """The protocol among ``clients`` in-process clients on the default adapter's vector.

    ``max_weight`` sizes the ring (the default 1024 keeps 32 bits up to 64 clients).
    """
    arrays = default_adapter_arrays()
    length = sum(v.size for v in arrays.values()) + TAIL
    field = FieldSpec.for_clients(1.0, 16, max_weight, clients)
    rng = np.random.default_rng(seed)
    nodes = [10_000 + i for i in range(clients)]
    inputs = {u: field.encode(rng.uniform(-0.1, 0.1, length - TAIL), 100, 1.0) for u in nodes}
    degree = auto_degree(clients)
    gone = tuple(nodes[: int(dropout * clients)])
    started = time.perf_counter()
    run = run_locally(inputs, degree=degree, threshold=auto_threshold(degree),
                      gone_before_mask=gone, seed=seed)
    wall = time.perf_counter() - started
    server = run.server
    payload = record_bytes(arrays)
    plain = 2 * payload * clients  # the adapter down, the same parts back up
    npy_headers = 128 * len(server.u3)  # the masked vector travels as one .npy array
    secure = (payload * clients + npy_headers
              + sum(s.bytes_down + s.bytes_up for s in server.stages.values()))
    return {
        "clients": clients, "degree": degree, "threshold": auto_threshold(degree),
        "ring_bits": field.ring_bits, "dropped": len(gone),
        "bytes_per_client_plain": plain / clients,
        "bytes_per_client_secure": secure / clients,
        "bytes_overhead": secure / plain,
        "server_seconds": {k: round(v, 4) for k, v in run.server_seconds.items()},
        "server_seconds_total": sum(run.server_seconds.values()),
        "server_seconds_per_client_neighbour": sum(run.server_seconds.values())
        / (clients * degree),
        "client_seconds_mean": sum(run.client_seconds.values()) / clients,
        "wall_seconds": wall,
    }


def simulated(secure: bool, *, rounds: int, clients: int, extra: dict[str, Any],
              results: str) -> list[dict[str, Any]]:
    """Round records of one simulation."""
    from simulations.simulate import simulate

    config = {"num-rounds": rounds, "results-dir": results, "secure-aggregation": secure,
              "keep-checkpoints": 0, **extra}
    return simulate(config, num_clients=clients)


def per_client_bytes(records: list[dict[str, Any]]) -> float:
    rounds = [r for r in records if r["round"] > 0]
    return sum((r["bytes_up"] + r["bytes_down"]) / r["num_sampled"] for r in rounds) / len(rounds)


def embedded_overhead(rounds: int) -> dict[str, Any]:
    """Plain and secure runs of the embedded default, side by side."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = simulated(False, rounds=rounds, clients=4, extra={}, results=f"{tmp}/plain")
        secure = simulated(True, rounds=rounds, clients=4, extra={}, results=f"{tmp}/secure")
    wall = {name: sum(r["seconds"] for r in recs if r["round"] > 0)
            for name, recs in (("plain", plain), ("secure", secure))}
    return {
        "round_seconds_plain": wall["plain"] / rounds,
        "round_seconds_secure": wall["secure"] / rounds,
        "secagg_round_overhead": wall["secure"] / wall["plain"],
        "bytes_per_client_plain": per_client_bytes(plain),
        "bytes_per_client_secure": per_client_bytes(secure),
        "secagg_bytes_overhead": per_client_bytes(secure) / per_client_bytes(plain),
        "final_accuracy_plain": plain[-1].get("eval_accuracy"),
        "final_accuracy_secure": secure[-1].get("eval_accuracy"),
        "stage_seconds": {s: secure[-1].get(f"secagg_{s.replace('-', '_')}_seconds")
                          for s in STAGES},
    }


def hundred_clients() -> dict[str, Any]:
    """One secure round with 100 simulated clients on a tiny model."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        records = simulated(True, rounds=1, clients=100, results=f"{tmp}/hundred", extra={
            "model": "tiny-bert", "partitioner": "iid", "local-steps": 2, "batch-size": 4,
            "min-train-nodes": 100,
            "min-available-nodes": 100, "eval-subset": 64})
        wall = time.perf_counter() - started
    r = records[-1]
    return {
        "wall_seconds": wall, "accepted": r["num_accepted"],
        "clients": {s: r.get(f"secagg_{s.replace('-', '_')}_clients") for s in STAGES},
        "seconds": {s: r.get(f"secagg_{s.replace('-', '_')}_seconds") for s in STAGES},
        "bytes": {s: r.get(f"secagg_{s.replace('-', '_')}_bytes") for s in STAGES},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rounds", type=int, default=2, help="rounds of each embedded run")
    p.add_argument("--sizes", default="10,50,100", help="client counts of the in-process runs")
    p.add_argument("--skip-embedded", action="store_true", help="no embedded-default runs")
    p.add_argument("--skip-hundred", action="store_true", help="no 100-client simulation")
    args = p.parse_args()
    out: dict[str, Any] = {}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    costs = {n: protocol_costs(n) for n in sizes}
    # the scaling is measured in one ring (32 bits: weights capped at 256) so that only
    # the number of clients changes
    scaling = {n: protocol_costs(n, max_weight=256) for n in sizes}
    out["protocol"] = {str(n): c for n, c in costs.items()}
    out["protocol_ring32"] = {str(n): c for n, c in scaling.items()}
    out["secagg_bytes_overhead_by_clients"] = {str(n): c["bytes_overhead"]
                                               for n, c in costs.items()}
    out["secagg_bytes_overhead_by_clients_ring32"] = {str(n): c["bytes_overhead"]
                                                      for n, c in scaling.items()}
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        growth = scaling[hi]["server_seconds_total"] / scaling[lo]["server_seconds_total"]
        out["server_work_growth"] = growth
        out["n_log_n_growth"] = hi * math.log(hi) / (lo * math.log(lo))
        out["n_log2_n_growth"] = hi * math.log(hi) ** 2 / (lo * math.log(lo) ** 2)
        out["linear_growth"] = hi / lo
    if not args.skip_embedded:
        embedded = embedded_overhead(args.rounds)
        out["embedded"] = embedded
        out["secagg_round_overhead"] = embedded["secagg_round_overhead"]
        out["secagg_bytes_overhead"] = embedded["secagg_bytes_overhead"]
        out["secagg_bytes_overhead_by_clients"]["4"] = embedded["secagg_bytes_overhead"]
    if not args.skip_hundred:
        out["hundred_clients"] = hundred_clients()
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    for n, c in costs.items():
        print(f"{n:4d} clients (degree {c['degree']}, threshold {c['threshold']}, ring "
              f"{c['ring_bits']} bits): bytes/client x{c['bytes_overhead']:.3f}, server "
              f"{c['server_seconds_total']:.3f} s, client {c['client_seconds_mean']:.3f} s")
    if "server_work_growth" in out:
        for n, c in scaling.items():
            print(f"{n:4d} clients, 32-bit ring: server {c['server_seconds']}, per client "
                  f"and neighbour {c['server_seconds_per_client_neighbour'] * 1e6:.0f} us")
        print(f"server work growth {out['server_work_growth']:.1f}x in one ring (n log n: "
              f"{out['n_log_n_growth']:.1f}x, n log^2 n: {out['n_log2_n_growth']:.1f}x, "
              f"linear {out['linear_growth']:.1f}x)")
    if "embedded" in out:
        e = out["embedded"]
        print(f"embedded default, 4 clients: round {e['round_seconds_plain']:.1f} s plain, "
              f"{e['round_seconds_secure']:.1f} s secure (x{e['secagg_round_overhead']:.3f}); "
              f"bytes/client x{e['secagg_bytes_overhead']:.3f}")
    if "hundred_clients" in out:
        h = out["hundred_clients"]
        print(f"100 clients: {h['accepted']} accepted in {h['wall_seconds']:.1f} s; "
              f"stage seconds {h['seconds']}")


if __name__ == "__main__":
    main()
