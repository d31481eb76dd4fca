"""The simulation engine on an existing Ray cluster: a head and a worker, clients on both.

``ray start --head`` and ``ray start --address=<head>`` on this machine stand in for two
machines (each with one CPU, so two one-CPU clients cannot share a node). The test's Ray
processes are found by their session folder and stopped by PID, whatever happens; Ray
instances of other runs on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from simulations.simulate import simulate
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.e2e
RAY = shutil.which("ray") or str(Path(os.__file__).parents[3] / "bin" / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster whose session lives in ``temp_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_by_pid(temp_dir: str) -> None:
    """Terminate the cluster's processes (and their children), then kill what is left."""
    procs = cluster_processes(temp_dir)
    procs += [c for p in procs for c in _children(p)]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def two_node_cluster():
    """A head and a worker node, one CPU each; yields the head's address."""
    temp_dir = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # Ray's socket paths must be short
    port = free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                        "--include-dashboard=false", *common],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common],
                       check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_by_pid(temp_dir)
        assert not cluster_processes(temp_dir), "a Ray process of the test outlived it"
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_clients_run_on_both_nodes_of_an_existing_cluster(two_node_cluster, tmp_path,
                                                          tiny_bert_dir, toy_csv):
    address, temp_dir = two_node_cluster
    raylets = {p.pid for p in cluster_processes(temp_dir) if p.name() == "raylet"}
    assert len(raylets) == 2, "the head and the worker each run a raylet"
    hosts: set[int] = set()  # the raylet under which each client actor runs
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    if "ClientAppActor" in " ".join(proc.info["cmdline"] or ()):
                        hosts.update(p.pid for p in proc.parents() if p.pid in raylets)
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results = tmp_path / "cluster"
    try:
        records = simulate(tiny_run_config(tiny_bert_dir, toy_csv, **{
            "num-rounds": 1, "results-dir": str(results), "local-steps": 2}),
            num_clients=2, cpus_per_client=1.0, gpus_per_client=0.0, ray_address=address)
    finally:
        done.set()
        watcher.join()
    assert records[-1]["num_accepted"] == 2
    assert hosts == raylets, "each node hosts one of the two one-CPU clients"
    assert json.loads((results / "summary.json").read_text())["failure"] is None
    # the driver only disconnected: the cluster is still there for the next run
    assert len({p.pid for p in cluster_processes(temp_dir) if p.name() == "raylet"}) == 2
