"""SecAgg+ protocol: the sum survives dropouts up to the threshold, and nothing less leaks."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from privacy.secagg_local import run_locally
from privacy.secagg_protocol import (
    ClientRound,
    ProtocolError,
    RoundAborted,
    ServerRound,
    auto_degree,
    auto_threshold,
    neighbour_graph,
)

LENGTH = 257


def run_round(n: int, threshold: int, *, degree: int | None = None, drop_before_mask=(),
              drop_before_unmask=(), dtype=np.uint32, seed: int = 0, record=None):
    """One round among in-process clients; returns (server, the true ring sum of U3, the result)."""
    rng = np.random.default_rng(seed)
    nodes = [1000 + 7 * i for i in range(n)]
    high = 2**32 if dtype == np.uint32 else 2**63
    inputs = {u: rng.integers(0, high, LENGTH, dtype=np.uint64).astype(dtype) for u in nodes}
    run = run_locally(inputs, degree=n - 1 if degree is None else degree, threshold=threshold,
                      gone_before_mask=tuple(drop_before_mask),
                      gone_before_unmask=tuple(drop_before_unmask), seed=seed, record=record)
    expected = np.zeros(LENGTH, dtype=dtype)
    for u in run.server.u3:
        expected += inputs[u]
    return run.server, expected, run.total


@pytest.mark.parametrize("drops", [0, 1, 2, 3, 4])
def test_ten_clients_threshold_six_survive_up_to_four_dropouts_after_masking(drops):
    nodes = [1000 + 7 * i for i in range(10)]
    server, expected, total = run_round(10, 6, drop_before_unmask=nodes[:drops])
    np.testing.assert_array_equal(total, expected)
    assert server.recovered["self-masks"] == 10


@pytest.mark.parametrize("drops", [1, 2, 4])
def test_ten_clients_threshold_six_survive_dropouts_after_sharing_keys(drops):
    nodes = [1000 + 7 * i for i in range(10)]
    server, expected, total = run_round(10, 6, drop_before_mask=nodes[-drops:])
    np.testing.assert_array_equal(total, expected)
    assert server.recovered["dropped-keys"] == drops
    assert server.recovered["self-masks"] == 10 - drops


def test_mixed_dropouts_in_both_stages():
    nodes = [1000 + 7 * i for i in range(10)]
    server, expected, total = run_round(10, 6, drop_before_mask=nodes[:2],
                                        drop_before_unmask=nodes[2:4])
    np.testing.assert_array_equal(total, expected)
    assert server.recovered == {"self-masks": 8, "dropped-keys": 2}


def test_five_dropouts_abort_the_round():
    nodes = [1000 + 7 * i for i in range(10)]
    with pytest.raises(RoundAborted, match="secagg-threshold 6 needed"):
        run_round(10, 6, drop_before_unmask=nodes[:5])
    with pytest.raises(RoundAborted, match="masked input"):
        run_round(10, 6, drop_before_mask=nodes[:5])


def test_sparse_graph_with_64_bit_ring():
    server, expected, total = run_round(30, 5, degree=8, dtype=np.uint64,
                                        drop_before_mask=[1000, 1007], drop_before_unmask=[1014])
    np.testing.assert_array_equal(total, expected)
    assert all(len(vs) == 8 for vs in server.graph.values())


def test_graph_is_regular_symmetric_and_complete_at_n_minus_1():
    nodes = list(range(11))
    for degree in (2, 4, 6, 10):
        graph = neighbour_graph(nodes, degree, random.Random(1))
        assert all(len(vs) == degree for vs in graph.values())
        assert all(u in graph[v] for u, vs in graph.items() for v in vs)
    assert auto_degree(10) == 9 and auto_degree(100) == 20 and auto_threshold(9) == 6


def make_client(node=1, neighbours=(2, 3, 4), threshold=3):
    state, _ = ClientRound.start(node, {"run": "1", "round": 1, "threshold": threshold,
                                         "neighbours": [str(v) for v in neighbours]})
    return state


def test_client_never_reveals_both_shares_of_one_peer():
    """The core safety rule: a b share and an s share of the same peer unmask it alone."""
    client = make_client()
    client.peers = {2: (b"\0" * 32, b"\0" * 32), 3: (b"\0" * 32, b"\0" * 32)}
    with pytest.raises(ProtocolError, match="both the self-mask and the key share"):
        client.unmask({"survivors": ["1", "2", "3"], "dropped": ["3"]})
    assert not client.unmasked


def test_client_answers_one_unmask_request_per_round():
    """A server asking again (first b shares, then s shares of the same peers) is refused."""
    nodes = [1000 + 7 * i for i in range(4)]
    server = ServerRound(1, 1, nodes, degree=3, threshold=3, rng=random.Random(0))
    clients = {}
    for node, request in server.setup_requests().items():
        clients[node], _ = ClientRound.start(node, request)
    victim = clients[nodes[0]]
    victim.peers = {v: (b"\0" * 32, b"\0" * 32) for v in nodes[1:]}
    victim.holders = sorted(nodes)
    victim.own_share = (b"s" * 32, b"b" * 16)
    victim.unmask({"survivors": [str(v) for v in nodes], "dropped": []})
    with pytest.raises(ProtocolError, match="second unmask request"):
        victim.unmask({"survivors": [str(v) for v in nodes[:3]], "dropped": [str(nodes[3])]})


def test_client_refuses_impossible_thresholds_and_strangers():
    with pytest.raises(ProtocolError, match="threshold 5 is not in 2..4"):
        make_client(threshold=5)
    client = make_client()
    with pytest.raises(ProtocolError, match="not a neighbour"):
        client.share_keys({"peers": {"9": ["AA==", "AA=="]}})
    with pytest.raises(ProtocolError, match="cannot hold 3 shares"):
        client.share_keys({"peers": {}})


def test_tampered_share_aborts_with_reason():
    """A share altered in transit does not authenticate; the holder's unmask reply fails."""
    n = 4
    nodes = [10, 20, 30, 40]
    server = ServerRound(1, 1, nodes, degree=3, threshold=3, rng=random.Random(0))
    clients = {}
    keys = {}
    for node, request in server.setup_requests().items():
        clients[node], keys[node] = ClientRound.start(node, request)
    asked = server.receive_keys(keys)
    shares = {u: clients[u].share_keys(r) for u, r in asked.items()}
    masking = server.receive_shares(shares, asked)
    blob = bytearray(__import__("base64").b64decode(masking[20]["inbox"]["10"]))
    blob[-1] ^= 1
    masking[20]["inbox"]["10"] = __import__("base64").b64encode(bytes(blob)).decode()
    for u in nodes:
        clients[u].receive_shares(masking[u])
        server.add_masked(u, clients[u].mask(np.zeros(8, dtype=np.uint32)))
    requests = server.unmask_requests()
    with pytest.raises(ProtocolError, match="does not authenticate"):
        clients[20].unmask(requests[20])
    assert n == len(server.u3)


def test_masked_inputs_are_uniform_even_for_a_constant_input():
    """What the server receives from a client is uniform in the ring, whatever x was."""
    received: list[bytes] = []
    nodes = [10, 20, 30, 40, 50, 60]
    inputs = {u: np.full(4096, 7, dtype=np.uint32) for u in nodes}  # identical, constant
    run = run_locally(inputs, degree=5, threshold=4, record=received)
    np.testing.assert_array_equal(run.total, np.full(4096, 42, dtype=np.uint32))
    masked = [np.frombuffer(r, dtype=np.uint32) for r in received if len(r) == 4 * 4096]
    assert len(masked) == 6
    for vector in masked:
        assert stats.kstest(vector / 2**32, "uniform").pvalue > 1e-4
        assert np.count_nonzero(vector == 7) < 5  # the input does not show through
    # the other messages the server receives hold no vector at all
    assert all(len(r) < 4096 for r in received if len(r) != 4 * 4096)


GARBAGE = [{}, {"c_pk": 5}, {"c_pk": "!!", "s_pk": None}, {"shares": [1, 2]},
           {"shares": {"1": 7}}, {"b": {"999": [1, "AA=="]}}, {"b": [["1", 2]]},
           {"s": {"1010": "x"}}, {"b": {"1000": [1]}}]


@pytest.mark.parametrize("stage", ["setup", "share-keys", "unmask"])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_malformed_replies_drop_their_sender_and_never_crash_the_server(garbage, stage):
    """A malicious client answers one stage with ``garbage``; the others finish the round."""
    rng = np.random.default_rng(0)
    nodes = [1000 + 7 * i for i in range(6)]
    liar = nodes[0]
    server = ServerRound(1, 1, nodes, degree=5, threshold=3, rng=random.Random(0))
    clients, keys = {}, {}
    for node, request in server.setup_requests().items():
        clients[node], keys[node] = ClientRound.start(node, request)
    if stage == "setup":
        keys[liar] = garbage
    asked = server.receive_keys(keys)
    shares = {u: clients[u].share_keys(r) for u, r in asked.items() if u in asked}
    if stage == "share-keys" and liar in shares:
        shares[liar] = garbage
    masking = server.receive_shares(shares, asked)
    expected = np.zeros(16, dtype=np.uint32)
    for u, request in masking.items():
        clients[u].receive_shares(request)
        x = rng.integers(0, 2**32, 16, dtype=np.uint64).astype(np.uint32)
        expected += x
        server.add_masked(u, clients[u].mask(x))
    replies = {u: clients[u].unmask(r) for u, r in server.unmask_requests().items()}
    if stage == "unmask":
        replies[liar] = garbage
    total = server.unmask(replies)
    np.testing.assert_array_equal(total, expected)  # the liar's input is in it at unmask
    if stage != "unmask":  # at unmask its shares are only missing (the others suffice)
        assert liar in server.dropped and liar not in server.u3
