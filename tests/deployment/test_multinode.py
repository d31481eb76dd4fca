"""A real TLS deployment on 127.0.0.1: SuperLink, 3 authenticated SuperNodes, one killed.

One module-scoped deployment does everything once (a 2-core machine cannot afford
two): ``fedlora certs`` material for 4 nodes; ``flower-superlink`` with TLS and
SuperNode authentication; 3 node keys registered with ``flwr supernode register``;
4 ``flower-supernode`` processes, the 4th with a key that was never registered, each
with the node config ``fedlora certs`` prints (its handshake signing key, the pinned
server payload key, ``require-encryption``, its own DP ledger file, a rank cap); then
``flwr run`` of this repository for 2 rounds of the tiny model with payload encryption
and secure aggregation on (SecAgg+ among the three nodes, threshold 2), given the server
payload key and the admitted client keys that ``fedlora certs``
wrote (``server-key-file``, ``client-keys-file``). When SuperNode 1 receives its round-2
train message, its whole process group (SuperNode, its SuperExec and ClientApp) is
SIGKILLed, after it shared its keys: round 2 must recover its masks and unmask the sum
of the other two once the SuperLink reports the dead node unavailable (or
``round-timeout`` passes), and the run must finish. Every
process is stopped by PID (process group, then what is left by PID) before the tests look
at the outcome, also when something fails half-way. About 2 minutes on 2 cores, a minute
of it waiting for Flower to notice the dead node.
"""

from __future__ import annotations

import json
import re
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from privacy import certs
from privacy.certs import DeploymentMaterial
from tests.conftest import tiny_run_config
from tests.deployment.processes import (
    Processes,
    Started,
    executable,
    flower_env,
    free_port,
    free_ports,
    https_get,
    json_of,
    run_config_arg,
    run_flwr,
    tail,
    wait_for,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NUM_NODES = 3  # registered SuperNodes; one more, unregistered, is refused
VICTIM = 1  # the SuperNode killed mid-round 2
# Generous, so that round 1 (three ClientApp processes starting at once on 2 cores) never
# times out. Round 2 ends earlier: the SuperLink marks the killed node offline when it
# misses heartbeats (Flower 1.42: 2 x 30 s after the last one) and answers its message
# with a "node unavailable" error, so the round waits 30-60 s after the kill.
ROUND_TIMEOUT = 150.0
RUN_TIMEOUT = 600.0
START_LINE = re.compile(r"fedlora client: round (\d+), partition (\d+) \(pid (\d+)\): training "
                        r"starts after ([\d.]+) s of setup \(process age ([\d.]+) s\)")
DONE_LINE = re.compile(r"fedlora client: round (\d+), partition (\d+) \(pid (\d+)\): (\d+) "
                       r"steps in ([\d.]+) s")


@dataclass
class ClientRound:
    """What one ClientApp process logged for one train message."""

    round: int
    partition: int
    pid: int
    setup_seconds: float
    process_age: float
    train_seconds: float | None = None


@dataclass
class Outcome:
    """Everything the deployment produced, gathered before its processes were stopped."""

    root: Path
    results: Path
    material: DeploymentMaterial
    nodes: list[Started]
    stranger: Started
    superlink_log: str
    run_log: str
    run_returncode: int | None
    listed_nodes: list[dict[str, object]]
    node_ids: dict[int, str]
    killed_at_round: int | None
    clients: list[ClientRound]
    lingering_after_run: list[str]
    stragglers: list[str]
    leftovers: list[str]
    port: int
    listening: set[tuple[str, int]]
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> list[dict[str, object]]:
        return json.loads((self.results / "metrics.json").read_text())


def client_rounds(text: str) -> list[ClientRound]:
    """The ClientApp timing lines (``client/app.py``) of a SuperNode log."""
    done = {(int(m[1]), int(m[2]), int(m[3])): float(m[5]) for m in DONE_LINE.finditer(text)}
    rounds = []
    for m in START_LINE.finditer(text):
        key = (int(m[1]), int(m[2]), int(m[3]))
        rounds.append(ClientRound(round=key[0], partition=key[1], pid=key[2],
                                  setup_seconds=float(m[4]), process_age=float(m[5]),
                                  train_seconds=done.get(key)))
    return rounds


def superlink_up(port: int, context: ssl.SSLContext) -> bool:
    try:
        return https_get(port, "/health", context, "localhost").startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def pem_body(public_key_file: Path) -> str:
    """The base64 body of a node key as the SuperLink logs it (PEM SubjectPublicKeyInfo)."""
    key = serialization.load_ssh_public_key(public_key_file.read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


def node_config(material: DeploymentMaterial, i: int) -> str:
    """SuperNode ``i``'s ``--node-config`` as ``fedlora certs`` prints it (the 4th node
    reuses a partition; its ledger is a file of its own in the test folder)."""
    text = certs.node_config_text(
        material, i, dp_ledger_file=str(material.folder.parent / f"state/dp-ledger-{i}.json"))
    return text.replace(f"partition-id={i} num-partitions={NUM_NODES + 1}",
                        f"partition-id={i % NUM_NODES} num-partitions={NUM_NODES}")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path,
            toy_csv: Path) -> Outcome:
    for name in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not executable(name):
            pytest.skip(f"{name} is not installed here")
    from simulations.cli import main as fedlora

    started = time.monotonic()
    seconds: dict[str, float] = {}
    root = tmp_path_factory.mktemp("multinode")
    (root / "logs").mkdir()
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    results = root / "results"

    # certificates and keys, as an operator makes them
    assert fedlora(["certs", "--out", str(root / "certs"), "--hosts", "localhost,127.0.0.1",
                    "--nodes", str(NUM_NODES + 1), "--days", "1"]) == 0
    material = DeploymentMaterial.in_folder(root / "certs", num_nodes=NUM_NODES + 1)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f"[superlink.{certs.DEFAULT_CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'root-certificates = "{material.ca_cert}"\n')
    # every process keeps its state (pins, ledgers, a default server key) here, never in
    # the user's home
    env = flower_env(flwr_home, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                     TOKENIZERS_PARALLELISM="false", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
                     FEDLORA_STATE_DIR=str(root / "state"))
    procs = Processes(logs=root / "logs", env=env, cwd=root)
    node_ids: dict[int, str] = {}
    listed: list[dict[str, object]] = []
    killed_at_round = None
    run: Started | None = None
    lingering: list[str] = []
    listening: set[tuple[str, int]] = set()
    try:
        superlink = procs.start("superlink", [
            str(executable("flower-superlink")),
            "--ssl-ca-certfile", str(material.ca_cert),
            "--ssl-certfile", str(material.server_cert),
            "--ssl-keyfile", str(material.server_key),
            "--enable-supernode-auth",
            "--host", "127.0.0.1", "--port", str(port),
            # the ServerApp runs in this venv; without this flag Flower 1.42 `uv sync`s the
            # app's dependencies into a fresh environment per run (several GB for torch)
            "--disable-runtime-dependency-installation",
        ])
        trusted = ssl.create_default_context(cafile=str(material.ca_cert))
        wait_for(lambda: superlink_up(port, trusted) or not superlink.alive(), 90,
                 "the SuperLink", diagnose=lambda: tail(superlink.log))
        assert superlink.alive(), tail(superlink.log)
        seconds["superlink_up"] = time.monotonic() - started

        # the last key is never registered; the three registrations run at once
        with ThreadPoolExecutor(NUM_NODES) as pool:
            registrations = list(pool.map(lambda pub: run_flwr(
                env, root, "supernode", "register", str(pub), certs.DEFAULT_CONNECTION,
                "--format", "json"), material.node_public_keys[:NUM_NODES]))
        for done in registrations:
            assert done.returncode == 0, done.stdout + done.stderr
            assert json_of(done.stdout)["success"] is True

        runtime_ports = free_ports(NUM_NODES + 1)
        nodes = []
        for i in range(NUM_NODES + 1):
            nodes.append(procs.start(f"supernode-{i}", [
                str(executable("flower-supernode")),
                "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(material.ca_cert),
                "--auth-supernode-private-key", str(material.node_keys[i]),
                "--node-config", node_config(material, i),
                "--port", str(runtime_ports[i]),
            ]))
        registered, stranger = nodes[:NUM_NODES], nodes[NUM_NODES]

        def activated() -> bool:
            for node in registered:
                assert node.alive(), tail(node.log)
            return all("SuperNode ID:" in node.text() for node in registered)

        wait_for(activated, 120, "3 SuperNodes activated",
                 diagnose=lambda: "\n".join(tail(n.log, 800) for n in nodes))
        wait_for(lambda: not stranger.alive(), 90, "the unregistered SuperNode to give up",
                 diagnose=lambda: tail(stranger.log))
        for i, node in enumerate(registered):
            node_ids[i] = re.findall(r"SuperNode ID: (\d+)", node.text())[0]
        listing = run_flwr(env, root, "supernode", "list", certs.DEFAULT_CONNECTION,
                           "--format", "json")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        listed[:] = json_of(listing.stdout)["nodes"]  # type: ignore[index]
        seconds["nodes_online"] = time.monotonic() - started

        config = tiny_run_config(tiny_bert_dir, toy_csv, **{
            "num-rounds": 2, "results-dir": str(results), "fraction-train": 1.0,
            "min-train-nodes": NUM_NODES, "min-available-nodes": NUM_NODES,
            "round-timeout": ROUND_TIMEOUT, "min-reply-fraction": 0.5,
            "encrypt-payloads": True, "secure-aggregation": True, "local-steps": 4,
            certs.RUN_SERVER_KEY_FILE: str(material.server_payload_key),
            certs.RUN_CLIENT_KEYS_FILE: str(material.allowed_clients),
        })
        run = procs.start("flwr-run", [
            str(executable("flwr")), "run", str(REPO), certs.DEFAULT_CONNECTION, "--stream",
            "--run-config", run_config_arg(config)])

        # mid-round: as soon as the victim has pulled its round-2 train message, before its
        # ClientApp (a fresh process that first imports Flower and torch) can answer
        victim = registered[VICTIM]
        received = r"Receiving: train message"
        deadline = time.monotonic() + RUN_TIMEOUT
        while run.alive() and time.monotonic() < deadline:
            if victim.count(received) >= 2:
                listening |= procs.listening()  # everything runs now, the ServerApp too
                procs.kill(victim)
                killed_at_round = 2
                seconds["killed"] = time.monotonic() - started
                break
            time.sleep(0.05)
        wait_for(lambda: not run.alive(), max(deadline - time.monotonic(), 1),
                 f"the run to finish ({RUN_TIMEOUT:.0f} s after it started)", interval=0.5,
                 diagnose=lambda: tail(run.log))
        seconds["run_done"] = time.monotonic() - started

        # a finished run leaves no ServerApp or ClientApp process behind
        def apps_gone() -> bool:
            lingering[:] = [p for p in procs.leftovers()
                            if "flwr-serverapp" in p or "flwr-clientapp" in p]
            return not lingering

        try:
            wait_for(apps_gone, 30, "the run's app processes to exit", interval=0.5)
        except TimeoutError:
            pass  # ``lingering`` keeps them; a test reports it
    finally:
        stragglers = procs.stop_all()
        seconds["total"] = time.monotonic() - started
    out = Outcome(
        root=root, results=results, material=material, nodes=registered, stranger=stranger,
        superlink_log=superlink.text(), run_log=run.text() if run else "",
        run_returncode=run.popen.returncode if run else None, listed_nodes=listed,
        node_ids=node_ids, killed_at_round=killed_at_round,
        clients=[c for n in registered for c in client_rounds(n.text())],
        lingering_after_run=lingering, stragglers=stragglers, leftovers=procs.leftovers(),
        port=port, listening=listening, seconds=seconds)
    print(f"\nmultinode deployment: {json.dumps(seconds)}")
    for c in sorted(out.clients, key=lambda c: (c.round, c.partition)):
        print(f"  round {c.round} partition {c.partition} pid {c.pid}: setup "
              f"{c.setup_seconds:.2f} s, process age {c.process_age:.2f} s, train "
              f"{c.train_seconds} s")
    return out


def test_two_rounds_over_tls_with_authenticated_nodes(outcome: Outcome) -> None:
    assert outcome.run_returncode == 0, outcome.run_log[-3000:]
    records = outcome.metrics()
    assert [r["round"] for r in records] == [0, 1, 2]
    first = records[1]
    assert first["num_sampled"] == NUM_NODES
    assert first["num_accepted"] == NUM_NODES, first  # every sampled client accepted
    assert first["num_rejected"] == 0 and first["num_failed"] == 0
    for r in records:
        assert 0.0 <= r["eval_accuracy"] <= 1.0
    assert (outcome.results / "final_adapter" / "adapter_config.json").exists()
    assert (outcome.results / "final_adapter" / "adapter_model.safetensors").exists()
    # the payloads were sealed end to end with the key `fedlora certs` wrote, the one every
    # node pins, and only the nodes' own signing keys were admitted: the ServerApp says so
    # and every node got the per-round key handshake
    pin = outcome.material.server_fingerprint()
    assert f"fingerprint {pin}" in outcome.run_log, outcome.run_log[-3000:]
    assert f"{NUM_NODES + 1} client key(s) admitted" in outcome.run_log
    assert "new server key" not in outcome.run_log
    assert "clients are not authenticated" not in outcome.run_log
    summary = json.loads((outcome.results / "summary.json").read_text())
    assert (summary["payload_encryption"], summary["clients_authenticated"]) == (True, True)
    assert summary["secure_aggregation"] is True
    # secure aggregation: setup, share-keys and unmask queries in each round, each in a
    # fresh ClientApp process, its state carried by the SuperNode's context
    assert first["secagg_unmask_clients"] == NUM_NODES and first["secagg_dropouts_recovered"] == 0
    for i, node in enumerate(outcome.nodes):
        expected = 5 if i == VICTIM else 6  # the victim died before its round-2 unmask
        assert node.count(r"Receiving: query\.fedlora_secagg message") == expected, \
            tail(node.log)
    for node in outcome.nodes:
        assert node.count(r"Receiving: query\.fedlora_handshake message") == 2, tail(node.log)
        assert "pinned the server key" not in node.text()  # pinned by config, not on first use
    # the nodes Flower lists are exactly the three registered ones
    assert sorted(str(n["node-id"]) for n in outcome.listed_nodes) == \
        sorted(outcome.node_ids.values())
    assert all(n["status"] == "online" for n in outcome.listed_nodes), outcome.listed_nodes
    partitions = {(c.round, c.partition) for c in outcome.clients}
    assert {(1, p) for p in range(NUM_NODES)} <= partitions


def test_everything_listens_on_loopback_only(outcome: Outcome) -> None:
    """One SuperLink port (Fleet, Control and ServerAppIo share it in Flower 1.42), one
    local Runtime API port per SuperNode; nothing on 0.0.0.0."""
    assert ("127.0.0.1", outcome.port) in outcome.listening
    assert len(outcome.listening) >= NUM_NODES + 1
    assert {ip for ip, _ in outcome.listening} == {"127.0.0.1"}, outcome.listening


def test_an_unregistered_node_is_refused_and_never_joins(outcome: Outcome) -> None:
    stranger = outcome.stranger
    assert stranger.popen.returncode not in (None, 0)
    assert "Failed to activate SuperNode" in stranger.text(), tail(stranger.log)
    assert "SuperNode ID" not in stranger.text()
    assert "Receiving:" not in stranger.text()
    # the SuperLink refused exactly that key
    refusal = [line for line in outcome.superlink_log.splitlines()
               if "No SuperNode found with the given public key" in line]
    assert refusal, outcome.superlink_log[-3000:]
    logged = "".join(refusal).replace("\\n", "")
    assert pem_body(outcome.material.node_public_keys[NUM_NODES]) in logged
    for pub in outcome.material.node_public_keys[:NUM_NODES]:
        assert pem_body(pub) not in logged
    assert len(outcome.listed_nodes) == NUM_NODES


def test_a_node_killed_mid_round_leaves_the_round_to_the_others(outcome: Outcome) -> None:
    assert outcome.killed_at_round == 2, "the victim never received its round-2 message"
    assert outcome.nodes[VICTIM].popen.returncode == -signal.SIGKILL
    assert outcome.run_returncode == 0, outcome.run_log[-3000:]
    second = outcome.metrics()[2]
    assert second["num_sampled"] == NUM_NODES
    assert second["num_accepted"] == NUM_NODES - 1, second
    assert second["num_rejected"] == 0
    assert (second["num_failed"] or 0) + (second.get("num_missing") or 0) == 1, second
    assert not second.get("abandoned"), second  # 2 of 3 clears min-reply-fraction 0.5
    # it had shared its keys: its pairwise masks were recovered from the others' shares
    assert second["secagg_dropouts_recovered"] == 1, second
    details = json.loads((outcome.results / "details.json").read_text())
    assert details["2"]["secure_aggregation"]["recovered"] == {
        "self-masks": NUM_NODES - 1, "dropped-keys": 1}
    assert second["eval_accuracy"] is not None
    log = outcome.run_log
    assert "round 2: 2 accepted" in log, log[-3000:]
    # the log says what happened to the dead node: the SuperLink answered for it with a
    # "node unavailable" error (sent from the SuperLink's own id; the server names the
    # node it had sent the message to), or the round timed out without its reply
    victim_id = outcome.node_ids[VICTIM]
    assert re.search(rf"round 2: node {victim_id} failed: .*Node Unavailable", log) or \
        "round 2: no reply from 1 sampled node" in log, log[-3000:]
    # the victim's ClientApp never got to train in round 2; the others did
    trained = {(c.round, c.partition) for c in outcome.clients}
    assert (2, VICTIM) not in trained
    assert {(2, p) for p in range(NUM_NODES) if p != VICTIM} <= trained


def test_every_train_message_gets_a_fresh_clientapp_process(outcome: Outcome) -> None:
    """Flower 1.42 runs one ``flwr-clientapp`` process per message, so nothing is cached.

    ``setup-seconds`` is therefore paid in every round, not only the first; the figures
    are printed (run with ``-s``) for the docs.
    """
    survivors = [p for p in range(NUM_NODES) if p != VICTIM]
    for partition in survivors:
        runs = {c.round: c for c in outcome.clients if c.partition == partition}
        assert set(runs) == {1, 2}
        assert runs[1].pid != runs[2].pid
        for c in runs.values():
            assert 0 < c.setup_seconds <= c.process_age
            assert c.train_seconds is not None and c.train_seconds > 0


def test_no_flower_process_is_left_behind(outcome: Outcome) -> None:
    # the finished run's ServerApp and ClientApps exited by themselves
    assert outcome.lingering_after_run == []
    # SIGTERM to each process group was enough (the SuperLink stops its detached
    # executor), and after teardown nothing of ours runs anywhere on the machine
    assert outcome.stragglers == []
    assert outcome.leftovers == []
