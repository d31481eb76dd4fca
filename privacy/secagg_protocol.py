"""SecAgg+ (Bell et al., CCS 2020): the protocol's two ends, without any transport.

Why one module of about 570 lines: the client's and the server's steps are the two
halves of one protocol; every message one end builds, the other end parses, and they
are read and changed together. The Flower wiring is :mod:`privacy.secagg_flower`.

One round, over the nodes the strategy sampled (Bonawitz et al. 2017's stages, on
SecAgg+'s sparse graph):

1. **setup** (advertise keys): the server draws a random ``k``-regular neighbour graph
   (:func:`neighbour_graph`); each client makes two X25519 key pairs (``c`` encrypts
   shares, ``s`` derives pairwise masks) and a 16-byte self-mask seed ``b``, and sends
   the public keys and a SHA-256 commitment to ``b``. ``U1``: the clients that answered.
2. **share keys**: each client gets its live neighbours' public keys, Shamir-shares
   ``s_sk`` and ``b`` among itself and them (threshold ``t``), encrypts each neighbour's
   share with AES-GCM under their pairwise ``c`` key, and sends the ciphertexts, which
   the server routes. ``U2``: the clients that sent valid shares.
3. **masked input**: with its training reply, each client in ``U2`` sends
   ``y = x + PRG(b) + sum_v (+/-) PRG(s_uv)`` over its neighbours ``v`` in ``U2``
   (``+`` when ``u < v``), where ``s_uv`` comes from X25519(``s_sk_u``, ``s_pk_v``).
   ``U3``: the clients whose masked input arrived. The server sums them.
4. **unmask**: each client in ``U3`` is asked for the ``b`` shares of its neighbours in
   ``U3`` and the ``s_sk`` shares of its neighbours in ``U2`` but not ``U3``; it refuses a
   request that names one peer in both lists, or a second request in the round (the
   rule that keeps a peer's input hidden: with both, the server could unmask it alone).
   With ``t`` shares of every needed secret, the server removes the self masks of
   ``U3`` and the pairwise masks that ``U3`` shares with the dropped clients; the sum
   of ``U3``'s inputs remains. Fewer than ``t`` shares, or fewer than ``t`` clients in
   ``U3``, abort the round.

Every secret is fresh per round. The server is trusted to follow the protocol (the
honest-but-curious model of the paper's main theorem); a server that lies about who
dropped is what rule 4 stops from unmasking anyone, as long as fewer than ``t`` of a
client's share holders collude with it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.secagg_crypto import (
    MAX_SHARE_HOLDERS,
    KeyPair,
    ShareError,
    combine_shares,
    decrypt,
    encrypt,
    expand_mask,
    new_seed,
    share_aad,
    split_secret,
)

STAGES = ("setup", "share-keys", "masked-input", "unmask")
SHARE_LABEL = "share-key"
MASK_LABEL = "pairwise-mask"
SELF_LABEL = "self-mask"


class ProtocolError(ValueError):
    """A client refuses a request, or a message breaks the protocol."""


class RoundAborted(RuntimeError):
    """Too few clients or shares to recover the sum; the round's updates stay hidden."""


def auto_degree(clients: int) -> int:
    """SecAgg+'s ``k = O(log n)`` neighbours: ``2 ceil(1.5 log2 n)``, at most ``n - 1``."""
    if clients <= 1:
        return 0
    return min(clients - 1, 2 * math.ceil(1.5 * math.log2(clients)))


def auto_threshold(degree: int) -> int:
    """A strict majority of a client's ``degree + 1`` share holders."""
    return (degree + 1) // 2 + 1


def neighbour_graph(nodes: list[int], degree: int, rng: random.Random) -> dict[int, list[int]]:
    """A random ``degree``-regular graph: a Harary ring over a random order of ``nodes``.

    Each node is joined to the ``degree // 2`` nodes on either side of it in the order,
    and for an odd degree to the node opposite; ``degree = n - 1`` is the complete graph.
    """
    order = list(nodes)
    rng.shuffle(order)
    n = len(order)
    k = min(degree, n - 1)
    links: dict[int, set[int]] = {u: set() for u in order}
    for i, u in enumerate(order):
        for j in range(1, k // 2 + 1):
            v = order[(i + j) % n]
            links[u].add(v)
            links[v].add(u)
        if k % 2 and n % 2 == 0:
            v = order[(i + n // 2) % n]
            links[u].add(v)
            links[v].add(u)
    return {u: sorted(vs) for u, vs in links.items()}


def b64(data: bytes) -> str:
    """Bytes as base64 text (messages are JSON, never pickle)."""
    return base64.b64encode(bytes(data)).decode()


def unb64(text: Any, size: int | None = None) -> bytes:
    """Base64 text back to bytes, of ``size`` bytes when given.

    Raises:
        ProtocolError: not base64 text, or another length.

    """
    if not isinstance(text, str):
        raise ProtocolError(f"expected base64 text, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError("invalid base64") from None
    if size is not None and len(raw) != size:
        raise ProtocolError(f"expected {size} bytes, got {len(raw)}")
    return raw


def encode(message: Mapping[str, Any]) -> bytes:
    """A protocol message as compact JSON bytes."""
    return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()


def decode(data: bytes, max_bytes: int = 64 * 2**20) -> dict[str, Any]:
    """Parse :func:`encode`'s bytes into a dict.

    Raises:
        ProtocolError: too large, not JSON, or not an object.

    """
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        value = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not a JSON message ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError("a message must be a JSON object")
    return value


def node_list(value: Any) -> list[int]:
    """A list of node ids from a message (strings of integers, as JSON keeps them exact).

    Raises:
        ProtocolError: not a list of integers.

    """
    if not isinstance(value, list):
        raise ProtocolError("expected a list of node ids")
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise ProtocolError("a node id is not an integer") from None


def commitment(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed (sent at setup; checks the seed recovered from shares)."""
    return hashlib.sha256(b"fedlora-secagg-b|" + seed).digest()


def pairwise_sign(u: int, v: int) -> int:
    """+1 when ``u`` adds the pairwise mask it shares with ``v``, -1 when it subtracts it."""
    return 1 if u < v else -1


# ---------------------------------------------------------------------------- client


@dataclass
class ClientRound:
    """One client's protocol state for one round; :meth:`dump`/:meth:`load` persist it."""

    node: int
    run_id: int
    server_round: int
    threshold: int
    neighbours: list[int]
    c_key: bytes = b""
    s_key: bytes = b""
    seed: bytes = b""
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    holders: list[int] = field(default_factory=list)
    own_share: tuple[bytes, bytes] = (b"", b"")
    inbox: dict[int, bytes] = field(default_factory=dict)
    mask_peers: list[int] = field(default_factory=list)
    unmasked: bool = False

    @classmethod
    def start(cls, node: int, request: Mapping[str, Any]) -> tuple[ClientRound, dict[str, Any]]:
        """Stage 1: fresh keys and seed; the reply advertises the public halves.

        Raises:
            ProtocolError: a malformed request, or an impossible threshold.

        """
        try:
            neighbours = node_list(request["neighbours"])
            threshold, run_id = int(request["threshold"]), int(request["run"])
            server_round = int(request["round"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed setup request ({exc})") from None
        if node in neighbours or len(set(neighbours)) != len(neighbours):
            raise ProtocolError("setup request lists this node or a neighbour twice")
        if not 2 <= threshold <= len(neighbours) + 1 <= MAX_SHARE_HOLDERS:
            raise ProtocolError(f"threshold {threshold} is not in 2..{len(neighbours) + 1} "
                                "(this node and its neighbours)")
        c, s, seed = KeyPair(), KeyPair(), new_seed()
        state = cls(node=node, run_id=run_id, server_round=server_round,
                    threshold=threshold, neighbours=neighbours, c_key=c.private_bytes(),
                    s_key=s.private_bytes(), seed=seed)
        return state, {"c_pk": b64(c.public_bytes), "s_pk": b64(s.public_bytes),
                       "b_commit": b64(commitment(seed))}

    def share_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 2: Shamir-share ``s_sk`` and ``b`` among the live neighbours, encrypted to each.

        Raises:
            ProtocolError: a peer that is not a neighbour, or too few live neighbours
                for the threshold.

        """
        peers_in = request.get("peers")
        if not isinstance(peers_in, dict):
            raise ProtocolError("share-keys request without peers")
        peers = {}
        for key, value in peers_in.items():
            v = int(key)
            if v not in self.neighbours:
                raise ProtocolError(f"node {v} is not a neighbour of this node")
            peers[v] = (unb64(value[0], 32), unb64(value[1], 32))
        if len(peers) + 1 < self.threshold:
            raise ProtocolError(f"{len(peers)} live neighbours cannot hold {self.threshold} "
                                "shares; refusing to share a secret that could not be recovered")
        self.peers = peers
        self.holders = sorted([self.node, *peers])
        s_shares = split_secret(self.s_key, self.threshold, len(self.holders))
        b_shares = split_secret(self.seed, self.threshold, len(self.holders))
        c = KeyPair.from_private_bytes(self.c_key)
        out = {}
        for i, holder in enumerate(self.holders):
            if holder == self.node:
                self.own_share = (s_shares[i], b_shares[i])
                continue
            key = c.agree(peers[holder][0], SHARE_LABEL, self.node, holder)
            body = encode({"owner": str(self.node), "holder": str(holder), "index": i + 1,
                           "s": b64(s_shares[i]), "b": b64(b_shares[i])})
            out[str(holder)] = b64(encrypt(key, body, share_aad(
                self.run_id, self.server_round, self.node, holder)))
        return {"shares": out}

    def receive_shares(self, request: Mapping[str, Any]) -> None:
        """Stage 3 (before masking): keep the shares routed to this node; note the mask peers.

        Raises:
            ProtocolError: a share or mask peer from a node that is not a live neighbour.

        """
        inbox = request.get("inbox", {})
        mask_peers = node_list(request.get("mask_peers"))
        if not isinstance(inbox, dict) or not set(mask_peers) <= set(self.peers):
            raise ProtocolError("masking request names nodes that are not live neighbours")
        if set(int(k) for k in inbox) != set(mask_peers):
            raise ProtocolError("the shares routed to this node are not from its mask peers")
        self.inbox = {int(k): unb64(v) for k, v in inbox.items()}
        self.mask_peers = mask_peers

    def mask(self, vector: np.ndarray) -> np.ndarray:
        """Stage 3: ``y = x + PRG(b) + sum_v (+/-) PRG(s_uv)`` in the vector's ring."""
        dtype = vector.dtype
        masked = vector + expand_mask(self.seed, vector.size, dtype, SELF_LABEL)
        s = KeyPair.from_private_bytes(self.s_key)
        for v in self.mask_peers:
            seed = s.agree(self.peers[v][1], MASK_LABEL, self.node, v)
            mask = expand_mask(seed, vector.size, dtype, MASK_LABEL)
            masked = masked + mask if pairwise_sign(self.node, v) > 0 else masked - mask
        return masked

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 4: the ``b`` shares of survivors and ``s_sk`` shares of dropped peers.

        Raises:
            ProtocolError: a peer asked for in both lists, a second unmask request this
                round, fewer than ``threshold`` survivors, or a peer with no share here.

        """
        survivors = node_list(request.get("survivors"))
        dropped = node_list(request.get("dropped"))
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise ProtocolError(f"asked for both the self-mask and the key share of node(s) "
                                f"{both}: that would unmask their input alone")
        if self.unmasked:
            raise ProtocolError("a second unmask request in the same round")
        if len(survivors) < self.threshold:
            raise ProtocolError(f"only {len(survivors)} surviving client(s) listed, "
                                f"{self.threshold} needed")
        self.unmasked = True
        c = KeyPair.from_private_bytes(self.c_key)
        out: dict[str, Any] = {"b": {}, "s": {}}
        for owner in sorted(set(survivors) | set(dropped)):
            if owner == self.node:
                share, index = self.own_share, self.holders.index(self.node) + 1
            elif owner in self.inbox:
                share, index = self._open_share(c, owner)
            else:
                continue  # not a neighbour that shared with this node
            kind, value = ("b", share[1]) if owner in survivors else ("s", share[0])
            out[kind][str(owner)] = [index, b64(value)]
        return out

    def _open_share(self, c: KeyPair, owner: int) -> tuple[tuple[bytes, bytes], int]:
        key = c.agree(self.peers[owner][0], SHARE_LABEL, owner, self.node)
        try:
            body = decode(decrypt(key, self.inbox[owner], share_aad(
                self.run_id, self.server_round, owner, self.node)))
        except ShareError as exc:
            raise ProtocolError(f"share from node {owner}: {exc}") from None
        if int(body["owner"]) != owner or int(body["holder"]) != self.node:
            raise ProtocolError(f"share from node {owner} is addressed to another pair")
        return (unb64(body["s"]), unb64(body["b"])), int(body["index"])

    def dump(self) -> bytes:
        """The state as JSON bytes (kept in the node's ``context.state`` between messages)."""
        return encode({
            "node": str(self.node), "run": str(self.run_id), "round": self.server_round,
            "threshold": self.threshold, "neighbours": [str(v) for v in self.neighbours],
            "c": b64(self.c_key), "s": b64(self.s_key), "b": b64(self.seed),
            "peers": {str(v): [b64(c), b64(s)] for v, (c, s) in self.peers.items()},
            "holders": [str(v) for v in self.holders],
            "own": [b64(self.own_share[0]), b64(self.own_share[1])],
            "inbox": {str(k): b64(v) for k, v in self.inbox.items()},
            "mask_peers": [str(v) for v in self.mask_peers], "unmasked": self.unmasked,
        })

    @classmethod
    def load(cls, data: bytes) -> ClientRound:
        """Restore :meth:`dump`."""
        d = decode(data)
        return cls(
            node=int(d["node"]), run_id=int(d["run"]), server_round=int(d["round"]),
            threshold=int(d["threshold"]), neighbours=node_list(d["neighbours"]),
            c_key=unb64(d["c"]), s_key=unb64(d["s"]), seed=unb64(d["b"]),
            peers={int(v): (unb64(c), unb64(s)) for v, (c, s) in d["peers"].items()},
            holders=node_list(d["holders"]), own_share=(unb64(d["own"][0]), unb64(d["own"][1])),
            inbox={int(k): unb64(v) for k, v in d["inbox"].items()},
            mask_peers=node_list(d["mask_peers"]), unmasked=bool(d["unmasked"]))


# ---------------------------------------------------------------------------- server


@dataclass
class StageStats:
    """One stage's figures: clients in and out, bytes each way, seconds."""

    clients_in: int = 0
    clients_out: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


class ServerRound:
    """The server's side of one round: routes keys and shares, sums, unmasks.

    Replies that break the protocol drop their sender from the round (with a reason in
    :attr:`dropped`); they never raise here.
    """

    def __init__(self, run_id: int, server_round: int, nodes: list[int], *, degree: int,
                 threshold: int, rng: random.Random | None = None) -> None:
        self.run_id = run_id
        self.server_round = server_round
        self.nodes = sorted(nodes)
        self.degree = min(degree, len(nodes) - 1)
        self.threshold = threshold
        if not 2 <= threshold <= self.degree + 1:
            raise ProtocolError(
                f"secagg-threshold {threshold} must be in 2..{self.degree + 1} (a client's "
                f"share holders: itself and its {self.degree} neighbours, with "
                f"{len(nodes)} clients)")
        self.graph = neighbour_graph(self.nodes, self.degree, rng or random.SystemRandom())
        self.keys: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.routed: dict[int, dict[str, str]] = {}
        self.total: np.ndarray | None = None
        self.dropped: dict[int, str] = {}
        self.recovered = {"self-masks": 0, "dropped-keys": 0}
        self.stages = {name: StageStats() for name in STAGES}

    def drop(self, node: int, reason: str) -> None:
        """Leave ``node`` out of the round (its first reason is kept)."""
        self.dropped.setdefault(node, reason)

    def setup_requests(self) -> dict[int, dict[str, Any]]:
        """Stage 1's request to every node: its neighbours, the threshold, run and round."""
        self.stages["setup"].clients_in = len(self.nodes)
        return {u: {"stage": "setup", "run": str(self.run_id), "round": self.server_round,
                    "threshold": self.threshold, "neighbours": [str(v) for v in self.graph[u]]}
                for u in self.nodes}

    def receive_keys(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 1's replies in; stage 2's requests out (each node's live neighbours' keys)."""
        for u in self.nodes:
            reply = replies.get(u)
            if reply is None:
                self.drop(u, "no reply at setup")
                continue
            try:
                self.keys[u] = (unb64(reply["c_pk"], 32), unb64(reply["s_pk"], 32),
                                unb64(reply["b_commit"], 32))
            except (KeyError, TypeError, ProtocolError) as exc:
                self.drop(u, f"malformed keys at setup ({exc})")
        live = {u: [v for v in self.graph[u] if v in self.keys] for u in self.keys}
        for u in list(live):
            if len(live[u]) + 1 < self.threshold:
                self.drop(u, f"{len(live[u])} live neighbours, {self.threshold - 1} needed")
                del live[u]
        self.stages["setup"].clients_out = len(live)
        self.stages["share-keys"].clients_in = len(live)
        return {u: {"stage": "share-keys", "peers": {
            str(v): [b64(self.keys[v][0]), b64(self.keys[v][1])] for v in vs}}
            for u, vs in live.items()}

    def receive_shares(self, replies: Mapping[int, Mapping[str, Any]],
                       asked: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 2's replies in; stage 3's per-node instructions out (routed shares, peers)."""
        sent: dict[int, dict[str, str]] = {}
        for u, request in asked.items():
            reply = replies.get(u)
            expected = set(request["peers"])
            if reply is None:
                self.drop(u, "no reply at share-keys")
                continue
            shares = reply.get("shares")
            if not isinstance(shares, dict) or set(shares) != expected or \
                    not all(isinstance(s, str) and len(s) < 4096 for s in shares.values()):
                self.drop(u, "share-keys reply does not hold one share per live neighbour")
                continue
            sent[u] = shares
        self.u2 = sorted(sent)
        inboxes: dict[int, dict[str, str]] = {v: {} for v in self.u2}
        for u, shares in sent.items():
            for v, blob in shares.items():
                if int(v) in inboxes:
                    inboxes[int(v)][str(u)] = blob
        self.routed = inboxes
        self.stages["share-keys"].clients_out = len(self.u2)
        self.stages["masked-input"].clients_in = len(self.u2)
        return {v: {"stage": "masked-input", "inbox": inbox,
                    "mask_peers": sorted(inbox, key=int)} for v, inbox in inboxes.items()}

    def add_masked(self, node: int, vector: np.ndarray) -> None:
        """Fold one masked input into the running ring sum (validated by the caller).

        Raises:
            ProtocolError: a node outside ``U2``, a second input, or another length.

        """
        if node not in self.u2 or node in self.u3:
            raise ProtocolError("masked input from a node not in the round, or a second one")
        if self.total is None:
            self.total = np.zeros(vector.shape, dtype=vector.dtype)
        if vector.shape != self.total.shape or vector.dtype != self.total.dtype:
            raise ProtocolError("masked input of another length or ring")
        self.total += vector
        self.u3.append(node)

    def unmask_requests(self) -> dict[int, dict[str, Any]]:
        """Stage 4's requests: each survivor's surviving and dropped neighbours.

        Raises:
            RoundAborted: fewer than ``threshold`` masked inputs arrived.

        """
        self.u3.sort()
        for u in set(self.u2) - set(self.u3):
            self.drop(u, "no masked input")
        self.stages["masked-input"].clients_out = len(self.u3)
        self.stages["unmask"].clients_in = len(self.u3)
        if len(self.u3) < self.threshold:
            raise RoundAborted(f"{len(self.u3)} masked input(s) arrived, secagg-threshold "
                               f"{self.threshold} needed")
        survivors, u2 = set(self.u3), set(self.u2)
        return {u: {"stage": "unmask",
                    "survivors": [str(v) for v in self.graph[u] + [u] if v in survivors],
                    "dropped": [str(v) for v in self.graph[u] if v in u2 - survivors]}
                for u in self.u3}

    def unmask(self, replies: Mapping[int, Mapping[str, Any]]) -> np.ndarray:
        """Stage 4's replies in; the sum of the survivors' inputs out (in the ring).

        Raises:
            RoundAborted: a needed secret has fewer than ``threshold`` valid shares, or
                a recovered secret does not match its owner's commitment or public key.

        """
        survivors, dropped = set(self.u3), set(self.u2) - set(self.u3)
        b_shares: dict[int, dict[int, bytes]] = {u: {} for u in survivors}
        s_shares: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
        answered = 0
        for holder, reply in replies.items():
            try:
                for kind, bucket in (("b", b_shares), ("s", s_shares)):
                    for owner, (index, share) in dict(reply.get(kind, {})).items():
                        owner = int(owner)
                        if owner not in bucket:
                            continue  # not a secret this round needs
                        holders = sorted([owner, *[v for v in self.graph[owner]
                                                   if v in self.keys]])
                        if holder in holders and int(index) == holders.index(holder) + 1:
                            bucket[owner][int(index)] = unb64(share)
                answered += 1
            except (TypeError, ValueError, AttributeError, ProtocolError) as exc:
                self.drop(holder, f"malformed unmask reply ({exc})")
        self.stages["unmask"].clients_out = answered
        assert self.total is not None
        total = self.total.copy()
        dtype, length = total.dtype, total.size
        for u in sorted(survivors):
            seed = self._recover(b_shares[u], u, "self-mask seed")
            if commitment(seed) != self.keys[u][2]:
                raise RoundAborted(f"the self-mask seed recovered for node {u} does not match "
                                   "its commitment (a corrupted share)")
            total -= expand_mask(seed, length, dtype, SELF_LABEL)
            self.recovered["self-masks"] += 1
        for v in sorted(dropped):
            s_key = KeyPair.from_private_bytes(self._recover(s_shares[v], v, "mask key"))
            if s_key.public_bytes != self.keys[v][1]:
                raise RoundAborted(f"the mask key recovered for node {v} does not match its "
                                   "public key (a corrupted share)")
            for u in self.graph[v]:
                if u in survivors:  # u's input still holds its mask with v
                    seed = s_key.agree(self.keys[u][1], MASK_LABEL, u, v)
                    mask = expand_mask(seed, length, dtype, MASK_LABEL)
                    total = total - mask if pairwise_sign(u, v) > 0 else total + mask
            self.recovered["dropped-keys"] += 1
        return total

    def _recover(self, shares: dict[int, bytes], owner: int, what: str) -> bytes:
        if len(shares) < self.threshold:
            raise RoundAborted(f"{len(shares)} share(s) of node {owner}'s {what} arrived, "
                               f"secagg-threshold {self.threshold} needed")
        try:
            return combine_shares(shares, self.threshold)
        except ShareError as exc:
            raise RoundAborted(f"node {owner}'s {what}: {exc}") from None

    def telemetry(self) -> dict[str, Any]:
        """Per stage: clients in and out, bytes down and up, seconds; dropouts recovered."""
        return {
            "stages": {name: vars(s).copy() for name, s in self.stages.items()},
            "recovered": dict(self.recovered),
            "dropped": {str(k): v for k, v in sorted(self.dropped.items())},
            "degree": self.degree, "threshold": self.threshold,
        }
