"""Cost of end-to-end encryption of adapters: bytes on the wire and seconds of crypto.

Side by side in one run, for the embedded default's adapter (MiniLM-L6: 12 modules with
A 8x384 and B 384x8, plus a 5x384 head, float32, ~0.3 MB) and for a LLaMA-7B-shaped q/v
adapter (32 layers x 2 modules, r=16, width 4096, float32, ~33 MB):

- ``raw_bytes``: the adapter's float32 bytes (sum of ``ndarray.nbytes``);
- ``record_bytes``: the sealed ``ConfigRecord`` counted as its keys' UTF-8 bytes plus its
  values' bytes (bytes and str values by length, ints as 8 bytes, as Flower counts them);
- ``wire_bytes``: the sealed ``ConfigRecord`` as Flower actually sends it
  (``ConfigRecord.deflate()``: protobuf plus Flower's object header);
- ``wire_overhead`` = wire_bytes / raw_bytes; ``record_overhead`` likewise;
- ``plain_wire_overhead``: the same adapter as a plain (unencrypted) ``ArrayRecord``, for
  reference;
- ``seal_seconds`` / ``open_seconds``: ``seal_arrays`` and ``open_sealed`` (median of
  ``--repeats``), ``crypto_seconds`` their sum, ``handshake_seconds`` both sides' key
  agreement for one client and round, ``serialise_seconds`` record to wire and back.

Top-level ``wire_overhead`` and ``crypto_seconds`` are the default adapter's;
``crypto_vs_step`` is ``crypto_seconds`` / the median time of one local training step of
the embedded default (MiniLM-L6, batch 16 x 128 tokens, LoRA r=8 with its head, CPU or
GPU as available), measured in the same run (skip it with ``--no-step``).

Usage: python bench/encryption.py [--json] [--repeats 5] [--no-step]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from privacy.keys import ServerIdentity
from privacy.transport import (
    EphemeralKey,
    PayloadContext,
    SealedPayload,
    SessionKeys,
    client_session_keys,
    manifest_of,
    open_sealed,
    seal_arrays,
    server_session_keys,
)

SHAPES: dict[str, dict[str, Any]] = {
    "minilm-r8": dict(prefix="base_model.model.encoder.layer", layers=6,
                      modules=("attention.self.query", "attention.self.value"), width=384,
                      rank=8, head=(5, 384)),
    "llama7b-r16": dict(prefix="base_model.model.model.layers", layers=32,
                        modules=("self_attn.q_proj", "self_attn.v_proj"), width=4096, rank=16,
                        head=None),
}
DEFAULT = "minilm-r8"
RUN, ROUND, SERVER, CLIENT = 1234567890123, 3, 1, 9876543210


def make_adapter(rng: np.random.Generator, prefix: str, layers: int, modules: tuple[str, ...],
                 width: int, rank: int, head: tuple[int, int] | None) -> dict[str, np.ndarray]:
    arrays = {}
    for i in range(layers):
        for module in modules:
            name = f"{prefix}.{i}.{module}"
            arrays[f"{name}.lora_A.weight"] = rng.standard_normal((rank, width), np.float32)
            arrays[f"{name}.lora_B.weight"] = rng.standard_normal((width, rank), np.float32)
    if head:
        arrays["base_model.model.classifier.weight"] = rng.standard_normal(head, np.float32)
    return arrays


def handshake() -> tuple[SessionKeys, SessionKeys]:
    identity, server_eph, client_eph = ServerIdentity.generate(), EphemeralKey(), EphemeralKey()
    client = client_session_keys(
        client_eph, server_public_key=identity.public_key_bytes,
        server_ephemeral_key=server_eph.public_key_bytes, pin=identity.fingerprint(),
        run_id=RUN, round=ROUND, client_node=CLIENT)
    server = server_session_keys(
        identity, server_eph, client_public_key=client_eph.public_key_bytes, run_id=RUN,
        round=ROUND, client_node=CLIENT)
    return server, client


def record_bytes(record: ConfigRecord) -> int:
    """Keys plus values: bytes/str by length, ints as 8 bytes."""
    return sum(len(k.encode()) + (len(v) if isinstance(v, bytes | str) else 8)
               for k, v in record.items())


def plain_wire_bytes(arrays: dict[str, np.ndarray]) -> int:
    """What Flower would send for the same adapter unencrypted (ArrayRecord and chunks)."""
    def size(obj: Any) -> int:
        return len(obj.deflate()) + sum(size(c) for c in (obj.children or {}).values())
    return size(ArrayRecord({k: Array(v) for k, v in arrays.items()}))


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(name: str, repeats: int) -> dict[str, float]:
    arrays = make_adapter(np.random.default_rng(0), **SHAPES[name])
    raw = sum(a.nbytes for a in arrays.values())
    handshake_s, (server, client) = median_seconds(handshake, repeats)
    up = PayloadContext(RUN, ROUND, CLIENT, SERVER)
    expected = manifest_of(arrays)
    seal_s, sealed = median_seconds(
        lambda: seal_arrays(arrays, key=client.send, context=up), repeats)
    record = sealed.to_record()
    wire = record.deflate()
    serialise_s, received = median_seconds(
        lambda: SealedPayload.from_record(ConfigRecord.inflate(record.deflate())), repeats)
    open_s, opened = median_seconds(
        lambda: open_sealed(received, key=server.receive, context=up, max_bytes=raw + 1024,
                            expected_manifest=expected), repeats)
    assert all(np.array_equal(opened[k], v) for k, v in arrays.items())
    plain = plain_wire_bytes(arrays)
    return {
        "tensors": len(arrays), "raw_bytes": raw, "record_bytes": record_bytes(record),
        "wire_bytes": len(wire), "wire_overhead": len(wire) / raw,
        "record_overhead": record_bytes(record) / raw, "plain_wire_bytes": plain,
        "plain_wire_overhead": plain / raw, "handshake_seconds": handshake_s,
        "seal_seconds": seal_s, "open_seconds": open_s, "crypto_seconds": seal_s + open_s,
        "serialise_seconds": serialise_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-step", action="store_true",
                        help="do not time a training step (no model is loaded)")
    args = parser.parse_args()
    results = {name: measure(name, args.repeats) for name in SHAPES}
    step = None if args.no_step else training_step_seconds(args.repeats)
    for name, r in results.items():
        print(f"{name:12s} {r['tensors']:4d} tensors  raw {r['raw_bytes'] / 1e6:8.3f} MB  "
              f"wire {r['wire_bytes'] / 1e6:8.3f} MB  overhead x{r['wire_overhead']:.5f} "
              f"(plain ArrayRecord x{r['plain_wire_overhead']:.5f})  "
              f"seal {r['seal_seconds'] * 1e3:7.2f} ms  open {r['open_seconds'] * 1e3:7.2f} ms  "
              f"handshake {r['handshake_seconds'] * 1e3:5.2f} ms")
    default = results[DEFAULT]
    ratio = None if step is None else default["crypto_seconds"] / step
    if step is not None:
        print(f"one training step of the default: {step:.3f} s; encrypt+decrypt / step = "
              f"{ratio:.5f}")
    if args.json:
        print(json.dumps({"wire_overhead": default["wire_overhead"],
                          "crypto_seconds": default["crypto_seconds"],
                          "step_seconds": step, "crypto_vs_step": ratio,
                          "repeats": args.repeats, **results}))


def training_step_seconds(repeats: int) -> float:
    """Median seconds of one local step (batch 16, 128 tokens) on the embedded default."""
    import dataclasses

    from task.runtime import TaskRuntime
    from task.settings import TaskSettings
    from task.training import train_local

    runtime = TaskRuntime.build(TaskSettings.from_run_config({}))
    data = runtime.encoded_partition(0, 4)
    settings = dataclasses.replace(runtime.settings.train, local_steps=1)
    train_local(runtime.model, runtime.tokenizer, data, settings, device=runtime.device)
    times = []
    for seed in range(repeats):
        result = train_local(runtime.model, runtime.tokenizer, data, settings,
                             device=runtime.device, seed=seed)
        times.append(result.seconds)
    return statistics.median(times)


if __name__ == "__main__":
    main()
