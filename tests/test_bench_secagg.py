"""The secure-aggregation benchmark's in-process part: its accounting, on 10 clients.

Timings are not asserted; the bytes are (they do not depend on the machine).
"""

from __future__ import annotations

from tests.test_bench_llm import load_bench


def test_protocol_costs_count_every_message_and_recover_the_dropouts():
    bench = load_bench("secure_aggregation")
    costs = bench.protocol_costs(10)
    assert costs["degree"] == 9 and costs["threshold"] == 6 and costs["ring_bits"] == 32
    assert costs["dropped"] == 1
    # FedIT sends the adapter down and back; the secure round adds the protocol messages
    # and sends one ring vector (no wider than float32) in place of the adapter's arrays
    assert 0.9 < costs["bytes_overhead"] < 1.1
    assert costs["bytes_per_client_secure"] > 2 * bench.record_bytes(
        bench.default_adapter_arrays()) * 0.9
    assert set(costs["server_seconds"]) == {"setup", "share-keys", "masked-input", "unmask"}
    wide = bench.protocol_costs(65)
    assert wide["ring_bits"] == 64 and wide["bytes_overhead"] > 1.3  # the upload doubles
