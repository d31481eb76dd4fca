"""Real Flower processes on 127.0.0.1 for deployment tests: start, watch, stop by PID.

Every process is started in a new session (``start_new_session=True``), so it and
what it launches share one process group: stopping a process signals its group. Not
everything stays in the group: ``flower-superlink`` starts its ``flower-superexec``
detached, in a session of its own, and that one starts ``flwr-serverapp``. So every
process also carries a marker in its environment (inherited by all it starts), and
:meth:`Processes.members` finds them all by marker or session id, also those whose
parent was killed and that were reparented.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MARKER = "FEDLORA_TEST_PROCESSES"  # environment variable naming a Processes instance
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode", "flower-superexec",
                   "flwr-serverapp", "flwr-clientapp")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def executable(name: str) -> str | None:
    """The console script ``name`` of this interpreter's environment, else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else shutil.which(name)


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no telemetry, this venv first on PATH.

    ``flower-supernode`` and ``flower-superlink`` launch ``flower-superexec`` by name, so
    the venv's bin folder must be on PATH.
    """
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def https_get(port: int, path: str, context: ssl.SSLContext, server_hostname: str) -> bytes:
    """A raw HTTP/1.1 GET over TLS to 127.0.0.1:``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=server_hostname) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_hostname}\r\n"
                    "Connection: close\r\n\r\n".encode())
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file ('' when it does not exist)."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.2, diagnose: Callable[[], str] = lambda: "") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                               f"{diagnose()}")
        time.sleep(interval)


@dataclass
class Started:
    """One process started by :class:`Processes`, the leader of its own session."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The leader's PID (also its process group and session id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the leader is still running."""
        return self.popen.poll() is None

    def text(self) -> str:
        """Everything the process (and its children) wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def count(self, pattern: str) -> int:
        """How many times ``pattern`` (a regular expression) occurs in the log."""
        return len(re.findall(pattern, self.text()))


@dataclass
class Processes:
    """Starts processes in their own sessions and stops every one of them by PID."""

    logs: Path
    env: dict[str, str]
    cwd: Path
    started: list[Started] = field(default_factory=list)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(self, name: str, argv: Sequence[str]) -> Started:
        """Start ``argv`` in a new session, stdout and stderr to ``<logs>/<name>.log``."""
        log = self.logs / f"{name}.log"
        with log.open("ab") as fh:
            popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     env={**self.env, MARKER: self.marker}, cwd=self.cwd,
                                     start_new_session=True)
        process = Started(name, popen, log)
        self.started.append(process)
        return process

    def members(self) -> list[psutil.Process]:
        """Every live process started here or by one of ours (zombies excluded)."""
        found = []
        sessions = {p.pid for p in self.started}
        for proc in psutil.process_iter(["pid", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            try:
                if os.getsid(proc.pid) in sessions or \
                        proc.environ().get(MARKER) == self.marker:
                    found.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def kill(self, process: Started, sig: int = signal.SIGKILL) -> None:
        """Signal ``process``'s whole group (a node with its executor and ClientApps)."""
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, process: Started, timeout: float = 15) -> None:
        """SIGTERM the group, wait, then SIGKILL it; reap the leader."""
        if process.alive():
            self.kill(process, signal.SIGTERM)
            try:
                process.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(process, signal.SIGKILL)
        try:
            process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass

    def stop_all(self, grace: float = 10) -> list[str]:
        """Stop every process (last started first), then what they left, by PID.

        What is left after the groups are gone (a detached executor, an app process it
        started) gets SIGTERM and ``grace`` seconds, then SIGKILL.

        Returns:
            ``"pid cmdline"`` of each process that had to be SIGKILLed on its own.

        """
        for process in reversed(self.started):
            self.stop(process)
        rest = self.members()
        for proc in rest:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(rest, timeout=grace)
        stragglers = []
        for proc in alive:
            try:
                stragglers.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=grace)
        return stragglers

    def listening(self) -> set[tuple[str, int]]:
        """The (address, port) pairs our processes listen on (TCP)."""
        found = set()
        for proc in self.members():
            try:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add((conn.laddr.ip, conn.laddr.port))
            except psutil.Error:
                continue
        return found

    def leftovers(self) -> list[str]:
        """``"pid cmdline"`` of every live process of ours that runs a Flower program."""
        found = []
        for proc in self.members():
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if any(program in cmdline for program in FLOWER_PROGRAMS):
                found.append(f"{proc.pid} {cmdline[:200]}")
        return found


# --- Flower commands ----------------------------------------------------------------------


def run_flwr(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI to completion (it needs FLWR_HOME's config.toml in ``env``)."""
    flwr = executable("flwr")
    assert flwr, "the flwr CLI is not installed"
    return subprocess.run([flwr, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def json_of(output: str) -> dict[str, object]:
    """The JSON object in a ``flwr ... --format json`` output (after any log lines)."""
    import json

    return json.loads(output[output.index("{"):])


def run_config_arg(config: dict[str, object]) -> str:
    """A ``--run-config`` value: strings quoted, booleans lower-case, numbers as they are."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = "'" + str(value).replace("'", "") + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)
