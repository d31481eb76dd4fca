"""The Docker Compose deployment: valid files, and the topology they describe is the real one.

Every topology check runs on two readings of the compose files: ``docker-compose config``
(Debian's docker-compose 1.29, which ``.ci/run`` installs; skipped where it is missing) and
the YAML interpolated here, so the checks hold without the binary too. Flags are checked
with Flower's own argument parsers, mounted files against what ``fedlora certs`` writes,
and the compose commands and healthchecks are run as processes on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from privacy.certs import DeploymentMaterial, normalise_hosts, write_deployment_material

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
REMOTE = ROOT / "deploy" / "supernode.yml"
REMOTE_GPU = ROOT / "deploy" / "supernode.gpu.yml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
REMOTE_ENV = {"FEDLORA_NODE": "3", "FEDLORA_NUM_PARTITIONS": "5",
              "FEDLORA_SUPERLINK_ADDRESS": "superlink.example.org:8000"}
SECRETS_DIR = "/run/secrets"
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_docker_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose is not installed (.ci/run installs it)")


# --- reading compose files ---------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                       r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution (``${X}``, ``${X:-d}``, ``${X-d}``, ``${X:?e}``, ``$$``)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and not current)
        if op in (":?", "?") and missing:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and missing:
            return str(arg)
        return current or ""

    return _VARIABLE.sub(substitute, value)


def read_compose(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """One compose file, interpolated, extension fields dropped (YAML merge keys resolved)."""
    raw = yaml.safe_load(path.read_text())
    return interpolate({k: v for k, v in raw.items() if not k.startswith("x-")}, env)


def compose_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment without any FEDLORA_/COMPOSE_ setting, plus ``extra``.

    Python's own variables are dropped too: docker-compose is Debian's Python program, and
    a PYTHONPATH or PYTHONHOME left by an earlier test (Ray sets them for its workers)
    would make it import this virtual environment's packages and fail.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEDLORA_", "COMPOSE_", "PYTHON")) and k != "VIRTUAL_ENV"}
    return {**env, **(extra or {})}


def docker_compose_config(files: list[Path], env: Mapping[str, str], env_file: Path,
                          ) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f ... config`` (its own validation) with a given env file."""
    assert DOCKER_COMPOSE is not None
    argv = [DOCKER_COMPOSE, "--env-file", str(env_file)]
    for path in files:
        argv += ["-f", str(path)]
    return subprocess.run([*argv, "config"], cwd=ROOT, env=compose_env(env), text=True,
                          capture_output=True, timeout=120)


@dataclass
class Compose:
    """A resolved compose configuration and the folder its relative paths start from."""

    config: dict[str, Any]
    base: Path

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.config["services"]

    def supernodes(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.services.items() if k.startswith("supernode")}

    def path(self, text: str) -> Path:
        return Path(os.path.normpath(self.base / os.path.expanduser(text)))

    def secret_files(self, service: str) -> dict[str, Path]:
        """Container path -> host file of every secret the service mounts."""
        mounts = {}
        for entry in self.services[service].get("secrets", []):
            source = entry if isinstance(entry, str) else entry["source"]
            target = source if isinstance(entry, str) else entry.get("target") or source
            if not target.startswith("/"):
                target = f"{SECRETS_DIR}/{target}"
            mounts[target] = self.path(self.config["secrets"][source]["file"])
        return mounts

    def volumes(self, service: str) -> dict[str, tuple[str, bool]]:
        """Container path -> (source, read-only); a bind source is an absolute path."""
        mounts = {}
        for entry in self.services[service].get("volumes", []):
            if isinstance(entry, dict):
                source, target = entry["source"], entry["target"]
                read_only = bool(entry.get("read_only"))
            else:
                parts = entry.split(":")
                source, target = parts[0], parts[1]
                read_only = len(parts) > 2 and "ro" in parts[2].split(",")
            if source.startswith((".", "/", "~")):
                source = str(self.path(source))
            mounts[target] = (source, read_only)
        return mounts

    def publications(self, service: str) -> dict[int, tuple[str, int]]:
        """Container port -> (host address, published host port); '' = every interface.

        Reads both forms: ``[ip:]host:container[/proto]`` strings and the long syntax
        (``host_ip``, ``published``, ``target``) that docker-compose prints.
        """
        ports = {}
        for entry in self.services[service].get("ports", []):
            if isinstance(entry, dict):
                ports[int(entry["target"])] = (str(entry.get("host_ip", "")),
                                               int(entry["published"]))
            else:
                text = str(entry).partition("/")[0]
                host, _, container = text.rpartition(":")
                address, _, published = host.rpartition(":")
                ports[int(container)] = (address, int(published))
        return ports

    def published(self, service: str) -> dict[int, int]:
        """Container port -> published host port."""
        return {target: port for target, (_, port) in self.publications(service).items()}

    def node_config(self, service: str) -> dict[str, Any]:
        """A SuperNode's ``--node-config``, parsed by Flower."""
        from flwr.common.config import parse_config_args

        return parse_config_args([supernode_args(self.services[service]["command"]).node_config])


def load(files: list[Path], how: str, env: Mapping[str, str] | None = None,
         tmp_path: Path | None = None) -> Compose:
    """The configuration of ``files`` read by ``how``: ``"python"`` or ``"docker-compose"``."""
    env = dict(env or {})
    if how == "python":
        assert len(files) == 1, "override files are only merged by docker-compose"
        return Compose(read_compose(files[0], env), files[0].parent)
    if DOCKER_COMPOSE is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    assert tmp_path is not None
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = docker_compose_config(files, env, empty)
    assert done.returncode == 0, done.stderr
    return Compose(yaml.safe_load(done.stdout), ROOT)


@pytest.fixture(params=["python", "docker-compose"])
def how(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def compose(how: str, tmp_path: Path) -> Compose:
    return load([COMPOSE], how, tmp_path=tmp_path)


# --- Flower's own view of the commands --------------------------------------------------------


def superlink_args(argv: list[str]) -> Any:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    assert argv[0] == "flower-superlink", argv
    return _parse_args_run_superlink().parse_args(argv[1:])


def supernode_args(argv: list[str]) -> Any:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    assert argv[0] == "flower-supernode", argv
    return _parse_args_run_supernode().parse_args(argv[1:])


def node_partition_of(args: Any) -> tuple[int, int]:
    from flwr.common.config import parse_config_args

    from client.partition import node_partition

    return node_partition(parse_config_args([args.node_config]))


def readme_certs_command() -> list[str]:
    """The ``fedlora certs`` command of the deployment guide's Docker Compose walk-through."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text[text.index("## With Docker Compose"):]
    block = section[section.index("```bash"):]
    block = block[:block.index("```", 3)]
    line = next(ln for ln in block.splitlines() if ln.startswith("fedlora certs "))
    return shlex.split(line.partition("#")[0])


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- the files are valid ------------------------------------------------------------------------


@needs_docker_compose
@pytest.mark.parametrize(("files", "env"), [
    ([COMPOSE], {}),
    ([COMPOSE, GPU], {}),
    ([REMOTE], REMOTE_ENV),
    ([REMOTE, REMOTE_GPU], REMOTE_ENV),
], ids=["compose", "compose+gpu", "remote-supernode", "remote-supernode+gpu"])
@pytest.mark.parametrize("env_file", ["empty", "example"])
def test_docker_compose_accepts_every_file(files: list[Path], env: dict[str, str],
                                           env_file: str, tmp_path: Path) -> None:
    path = ENV_EXAMPLE
    if env_file == "empty":
        path = tmp_path / "empty.env"
        path.write_text("")
    done = docker_compose_config(files, env, path)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr  # e.g. an unset variable


@needs_docker_compose
def test_docker_compose_and_this_reading_agree(tmp_path: Path) -> None:
    ours, theirs = load([COMPOSE], "python"), load([COMPOSE], "docker-compose",
                                                    tmp_path=tmp_path)
    assert ours.services.keys() == theirs.services.keys()
    for name in ours.services:
        assert ours.services[name]["command"] == theirs.services[name]["command"], name
        assert ours.secret_files(name) == theirs.secret_files(name), name
        assert ours.volumes(name) == theirs.volumes(name), name
        assert ours.publications(name) == theirs.publications(name), name
        assert ours.services[name].get("environment") == \
            theirs.services[name].get("environment"), name


@needs_docker_compose
def test_the_remote_supernode_needs_its_settings(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    for missing in REMOTE_ENV:
        env = {k: v for k, v in REMOTE_ENV.items() if k != missing}
        done = docker_compose_config([REMOTE], env, empty)
        assert done.returncode != 0 and missing in done.stderr, (missing, done.stderr)


def test_env_example_names_exactly_the_variables_the_files_use() -> None:
    used = set()
    for path in (COMPOSE, GPU, REMOTE, REMOTE_GPU):
        used |= {m["name"] for m in _VARIABLE.finditer(path.read_text()) if m["name"]}
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#")}
    remote_only = {"FEDLORA_NODE", "FEDLORA_GPU"}  # per node, on the command line
    assert example == used - remote_only
    for name in example:  # every setting of the main files has a default
        assert re.search(r"\$\{" + name + r":-", COMPOSE.read_text() + GPU.read_text()), name


# --- the topology ------------------------------------------------------------------------------


def test_superlink_serves_tls_with_supernode_auth_and_keeps_its_state(compose: Compose) -> None:
    service = compose.services["superlink"]
    args = superlink_args(service["command"])
    assert not args.insecure and args.enable_supernode_auth
    assert args.isolation == "subprocess"
    assert args.runtime_dependency_install is False  # everything is in the image
    assert args.host == "0.0.0.0"  # inside the container: the compose network reaches it
    secrets = compose.secret_files("superlink")
    certs = ROOT / "deploy" / "certs"
    assert set(secrets.values()) == {secrets[args.ssl_ca_certfile], secrets[args.ssl_certfile],
                                     secrets[args.ssl_keyfile], certs / "server-payload.key",
                                     certs / "allowed-clients.txt"}
    assert secrets[args.ssl_ca_certfile] == certs / "ca.crt"
    assert secrets[args.ssl_certfile] == certs / "server.crt"
    assert secrets[args.ssl_keyfile] == certs / "server.key"
    # the database lives on a named volume, not in the container's own file system
    database = Path(args.database)
    volumes = compose.volumes("superlink")
    assert str(database.parent) in volumes
    state_source, read_only = volumes[str(database.parent)]
    assert state_source in compose.config["volumes"] and not read_only
    results_source, _ = volumes["/app/results"]
    assert results_source in compose.config["volumes"]
    assert compose.published("superlink") == {args.port: 8000}
    assert service["restart"] == "unless-stopped" and service["init"] is True
    # a ServerApp without server-key-file keeps its key on the state volume
    assert service["environment"]["FEDLORA_STATE_DIR"] == str(database.parent)


def test_each_supernode_has_its_own_key_the_ca_and_its_partition(compose: Compose) -> None:
    superlink = superlink_args(compose.services["superlink"]["command"])
    ca = compose.secret_files("superlink")[superlink.ssl_ca_certfile]
    nodes = compose.supernodes()
    assert sorted(nodes) == [f"supernode-{i}" for i in range(len(nodes))] and len(nodes) == 3
    partitions, data = [], set()
    for name, service in nodes.items():
        args = supernode_args(service["command"])
        assert not args.insecure and args.isolation == "subprocess"
        assert args.superlink == f"superlink:{superlink.port}"
        secrets = compose.secret_files(name)
        assert secrets[args.root_certificates] == ca
        assert secrets[args.auth_supernode_private_key] == ca.parent / f"{name}.key"
        index = name.rpartition("-")[2]
        assert set(secrets.values()) == {  # no other key
            ca, ca.parent / f"{name}.key", ca.parent / f"client-{index}.key",
            ca.parent / "server-payload.pin"}
        partitions.append((name, node_partition_of(args)))
        source, read_only = compose.volumes(name)["/data"]
        assert read_only and source.endswith(f"/{name}")
        data.add(source)
        assert service["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert sorted(partitions) == [(f"supernode-{i}", (i, len(nodes))) for i in range(len(nodes))]
    assert len(data) == len(nodes)


def test_the_port_is_published_on_loopback_only_by_default(how: str, tmp_path: Path) -> None:
    """Fleet, Control and Runtime APIs share the SuperLink's port, and Flower 1.42's Control
    API authenticates nobody (tests/deployment/test_flower_trust.py): by default only this
    host reaches it; the SuperNodes of the file use the compose network."""
    compose = load([COMPOSE], how, {}, tmp_path)
    port = superlink_args(compose.services["superlink"]["command"]).port
    assert compose.publications("superlink") == {port: ("127.0.0.1", 8000)}
    for name in compose.supernodes():
        assert compose.publications(name) == {}, name
        assert supernode_args(compose.services[name]["command"]).superlink == \
            f"superlink:{port}"
    # the example .env keeps it so
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["FEDLORA_PUBLISH_ADDRESS"] == "127.0.0.1"
    if how == "docker-compose":
        done = docker_compose_config([COMPOSE], {}, ENV_EXAMPLE)
        assert done.returncode == 0, done.stderr
        assert Compose(yaml.safe_load(done.stdout), ROOT).publications("superlink") == {
            port: ("127.0.0.1", 8000)}
    # publishing it for SuperNodes elsewhere is a deliberate setting
    moved = load([COMPOSE], how, {"FEDLORA_PUBLISH_ADDRESS": "10.0.0.5",
                                  "FEDLORA_SUPERLINK_PORT": "8443"}, tmp_path)
    assert moved.publications("superlink") == {port: ("10.0.0.5", 8443)}
    assert "DOCKER-USER" in COMPOSE.read_text() and "DOCKER-USER" in ENV_EXAMPLE.read_text()


NODE_FILES = [([COMPOSE], {}), ([COMPOSE, GPU], {}), ([REMOTE], REMOTE_ENV),
              ([REMOTE, REMOTE_GPU], REMOTE_ENV)]


@pytest.mark.parametrize(("files", "env"), NODE_FILES,
                         ids=["compose", "compose+gpu", "remote", "remote+gpu"])
def test_every_supernode_ships_the_secure_node_settings(files: list[Path], env: dict[str, str],
                                                        how: str, tmp_path: Path) -> None:
    """Its own handshake key, the pinned server key, no plaintext, a DP ledger that outlives
    the container, a rank cap: each read by the ClientApp under these exact names."""
    from client.dp import LEDGER_FILE_KEY
    from client.policy import DP_KEYS, NodePolicy
    from client.ranks import BUDGET_KEY
    from privacy.flower import CLIENT_KEY_FILE_KEY, PIN_FILE_KEY, PIN_KEY, REQUIRE_KEY

    if len(files) > 1 and how == "python":
        pytest.skip("override files are merged by docker-compose only")
    compose = load(files, how, env, tmp_path)
    certs = ROOT / "deploy" / "certs"
    nodes = compose.supernodes()
    assert nodes
    ledgers = set()
    for name in nodes:
        config = compose.node_config(name)
        assert set(config) == {"partition-id", "num-partitions", CLIENT_KEY_FILE_KEY,
                               PIN_FILE_KEY, REQUIRE_KEY, LEDGER_FILE_KEY, BUDGET_KEY,
                               "dp-max-epsilon", "dp-required"}, name
        assert {k for k in config if k.startswith("dp-")} <= DP_KEYS
        assert PIN_KEY not in config  # the pin comes from the mounted file
        policy = NodePolicy.from_node_config(config)  # the node's policy parses
        assert (policy.max_lora_rank, policy.dp_max_epsilon, policy.dp_required) == \
            (16, 10.0, False)
        assert policy.dp_ledger == "file" and policy.dp_ledger_file == config[LEDGER_FILE_KEY]
        index = config["partition-id"]  # also the index of the node's keys
        secrets = compose.secret_files(name)
        assert secrets[config[CLIENT_KEY_FILE_KEY]] == certs / f"client-{index}.key"
        assert secrets[config[PIN_FILE_KEY]] == certs / "server-payload.pin"
        assert config[REQUIRE_KEY] is True
        # the ledger is on a named volume of the node's own, writable, where its state is
        ledger = Path(config[LEDGER_FILE_KEY])
        source, read_only = compose.volumes(name)[str(ledger.parent)]
        assert source in compose.config["volumes"] and not read_only
        assert compose.services[name]["environment"]["FEDLORA_STATE_DIR"] == \
            str(ledger.parent)
        ledgers.add(source)
    assert len(ledgers) == len(nodes)
    assert "superlink-state" not in ledgers


def compose_run_command() -> list[str]:
    """The ``flwr run`` command of docker-compose.yml's header."""
    line = next(ln for ln in COMPOSE.read_text().splitlines() if ln.startswith("#   flwr run "))
    return shlex.split(line.removeprefix("#"))


def test_the_run_command_gives_the_serverapp_its_key_and_the_admitted_clients(
        compose: Compose) -> None:
    from flwr.common.config import parse_config_args

    argv = compose_run_command()
    assert argv[:4] == ["flwr", "run", ".", "fedlora"]
    run_config = parse_config_args([option(argv, "--run-config")])
    secrets = compose.secret_files("superlink")  # the ServerApp runs in that container
    certs = ROOT / "deploy" / "certs"
    assert secrets[run_config["server-key-file"]] == certs / "server-payload.key"
    assert secrets[run_config["client-keys-file"]] == certs / "allowed-clients.txt"
    assert "/app/results" in compose.volumes("superlink")
    assert run_config["results-dir"].startswith("/app/results/")
    # Flower refuses a run-config key the app does not declare
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    assert set(run_config) <= set(declared), set(run_config) - set(declared)


def test_the_mounted_payload_keys_fit_together(tmp_path: Path) -> None:
    """What each container reads, loaded as the ServerApp and the ClientApps load it."""
    from flwr.common.config import parse_config_args

    from privacy.client_keys import AllowedClients, ClientIdentity
    from privacy.flower import CLIENT_KEY_FILE_KEY, PIN_FILE_KEY
    from privacy.keys import ServerIdentity, verify_pinned

    material = write_deployment_material(tmp_path / "certs", hosts=["superlink"], num_nodes=3,
                                         days=1)
    compose = load([COMPOSE], "python", {"FEDLORA_CERTS_DIR": str(material.folder)})
    server = compose.secret_files("superlink")
    run_config = parse_config_args([option(compose_run_command(), "--run-config")])
    identity = ServerIdentity.load(server[run_config["server-key-file"]])
    allowed = AllowedClients.load(server[run_config["client-keys-file"]])
    assert len(allowed) == 3
    keys = set()
    for name in compose.supernodes():
        config, secrets = compose.node_config(name), compose.secret_files(name)
        client = ClientIdentity.load(secrets[config[CLIENT_KEY_FILE_KEY]])
        assert client.public_line() in material.allowed_clients.read_text()
        keys.add(client.public_key_bytes)
        pin = secrets[config[PIN_FILE_KEY]].read_text().strip()
        assert pin == identity.fingerprint()
        verify_pinned(identity.public_key_bytes, pin)
    assert len(keys) == 3


def test_mounted_files_are_what_fedlora_certs_writes(compose: Compose) -> None:
    from simulations.cli import build_parser

    default_out = build_parser().parse_args(["certs"]).out
    material = DeploymentMaterial.in_folder(ROOT / default_out,
                                            num_nodes=len(compose.supernodes()))
    mounted = {p for name in compose.services for p in compose.secret_files(name).values()}
    assert mounted == set(material.files) - {material.ca_key, *material.node_public_keys}
    # the deployment guide's command writes this material, for the name the SuperNodes dial
    argv = readme_certs_command()
    assert ROOT / option(argv, "--out") == material.folder
    assert int(option(argv, "--nodes")) == material.num_nodes
    hosts = normalise_hosts(option(argv, "--hosts").split(","))
    for name in compose.supernodes():
        dialled = supernode_args(compose.services[name]["command"]).superlink
        assert dialled.rpartition(":")[0] in hosts


def test_certs_dir_is_a_setting(how: str, tmp_path: Path) -> None:
    material = write_deployment_material(tmp_path / "certs", hosts=["superlink"], num_nodes=3,
                                         days=1)
    moved = load([COMPOSE], how, {"FEDLORA_CERTS_DIR": str(material.folder)}, tmp_path)
    mounted = {p for name in moved.services for p in moved.secret_files(name).values()}
    assert mounted and all(path.is_file() and path.parent == material.folder
                           for path in mounted)


def test_healthchecks_probe_the_ports_the_commands_open(compose: Compose) -> None:
    superlink = superlink_args(compose.services["superlink"]["command"])
    probe = " ".join(compose.services["superlink"]["healthcheck"]["test"])
    assert f"https://127.0.0.1:{superlink.port}/health" in probe
    assert f"cafile='{superlink.ssl_ca_certfile}'" in probe
    for service in compose.supernodes().values():
        args = supernode_args(service["command"])
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://{args.host}:{args.port}/health" in probe  # the Runtime API


def test_remote_supernode_matches_the_local_ones(how: str, tmp_path: Path) -> None:
    remote = load([REMOTE], how, REMOTE_ENV, tmp_path)
    local = load([COMPOSE], how, {}, tmp_path)
    (name, service), = remote.services.items()
    args = supernode_args(service["command"])
    local_args = supernode_args(local.services["supernode-0"]["command"])
    assert args.superlink == REMOTE_ENV["FEDLORA_SUPERLINK_ADDRESS"]
    assert node_partition_of(args) == (3, 5)
    assert (args.insecure, args.isolation) == (local_args.insecure, local_args.isolation)
    secrets = remote.secret_files(name)
    certs = ROOT / "deploy" / "certs"  # the same folder as the main file's default
    assert secrets[args.root_certificates] == certs / "ca.crt"
    assert secrets[args.auth_supernode_private_key] == certs / "supernode-3.key"
    assert set(secrets.values()) == {certs / "ca.crt", certs / "supernode-3.key",
                                     certs / "client-3.key", certs / "server-payload.pin"}
    assert remote.volumes(name)["/data"] == (str(ROOT / "deploy/data/supernode-3"), True)
    # the same node config as a local SuperNode, but for its own partition and key
    own = ("partition-id", "num-partitions", "client-key-file")
    config, local_config = remote.node_config(name), local.node_config("supernode-0")
    assert set(config) == set(local_config)
    assert {k: v for k, v in config.items() if k not in own} == \
        {k: v for k, v in local_config.items() if k not in own}
    assert secrets[config["client-key-file"]] == certs / "client-3.key"
    assert service["environment"] == local.services["supernode-0"]["environment"]
    local_build = local.services["superlink"]["build"]
    assert remote.path(service["build"]["context"]) == local.path(local_build["context"])
    assert service["build"]["args"] == local_build["args"]


def built_once(compose: Compose) -> None:
    """Every image is built by exactly one service: parallel builds of one tag collide."""
    images = {s["image"] for s in compose.services.values()}
    for image in images:
        builders = [n for n, s in compose.services.items() if s["image"] == image and "build" in s]
        assert len(builders) == 1, (image, builders)


def test_each_image_is_built_by_one_service(compose: Compose) -> None:
    built_once(compose)
    assert {s["image"] for s in compose.services.values()} == {"fedlora:latest"}


def test_gpus_are_reserved_only_by_the_override(tmp_path: Path) -> None:
    base = read_compose(COMPOSE, {})
    assert all("deploy" not in s for s in base["services"].values())  # runs without GPUs
    override = read_compose(GPU, {})
    assert set(override["services"]) == set(Compose(base, ROOT).supernodes())
    for files, env in (([COMPOSE, GPU], {}), ([REMOTE, REMOTE_GPU], REMOTE_ENV)):
        if DOCKER_COMPOSE is None:
            break
        merged = load(files, "docker-compose", env, tmp_path)
        built_once(merged)
        for name, service in merged.services.items():
            if not name.startswith("supernode"):
                assert "deploy" not in service and service["image"] == "fedlora:latest"
                continue
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices == [{"driver": "nvidia", "device_ids": ["0"],
                                "capabilities": ["gpu"]}], name
            assert service["image"] == "fedlora:cuda"
            if "build" in service:
                assert "whl/cu" in service["build"]["args"]["TORCH_INDEX_URL"]
                assert service["build"]["args"]["APP_UID"] == "1000"


# --- the image ---------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def copied_sources() -> list[str]:
    """What the Dockerfile's COPY instructions take from the build context, in order."""
    return [word for instruction, arguments in dockerfile() if instruction == "COPY"
            for word in arguments.split()[:-1] if not word.startswith("--")]


def test_dockerfile_installs_the_project_with_constraints() -> None:
    steps = dockerfile()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert ("FROM", "${PYTHON_IMAGE}") in steps
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = [a for i, a in steps if i == "RUN"]
    install = next(r for r in runs if re.search(r'pip install -c constraints\.txt "\.\[demo\]"',
                                                r))
    copied = copied_sources()
    assert copied.index("constraints.txt") < copied.index("pyproject.toml")
    # torch at the version constraints.txt pins, from TORCH_INDEX_URL
    torch_run = next(r for r in runs if "torch_pin=" in r)
    assert runs.index(torch_run) < runs.index(install)
    pin_command = re.search(r'torch_pin="\$\((.+?)\)"', torch_run)
    assert pin_command is not None
    pinned = subprocess.run(["bash", "-c", pin_command[1]], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert pinned in (ROOT / "constraints.txt").read_text().splitlines()
    assert pinned.startswith("torch==")
    assert '--index-url "${TORCH_INDEX_URL}" "${torch_pin}"' in torch_run
    # every package the distribution holds is copied, with what setuptools needs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]
                ["include"]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= set(copied)
    # the services run as a non-root user, with the build arguments compose passes
    assert [a for i, a in steps if i == "USER"][-1] == "app"
    for path in (COMPOSE, GPU):
        for service in read_compose(path, {})["services"].values():
            if "build" in service:
                assert set(service["build"]["args"]) <= set(args) | {"PYTHON_IMAGE"}
                assert service["build"]["context"] == "."


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching rule wins)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] in "*?":
                out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for rule in patterns:
        negated = rule.startswith("!")
        pattern = os.path.normpath(rule[1:] if negated else rule).lstrip("/")
        if any(regex(pattern).match(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_keys_and_local_state_out_of_the_image() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in ("deploy/certs/ca.key", "deploy/certs/supernode-0.key",
                 "deploy/certs/client-0.key", "deploy/certs/server-payload.key", ".env",
                 "deploy/data/supernode-0/news.csv", "results/latest/metrics.json",
                 ".git/config", ".venv/bin/python", "tests/test_compose.py",
                 "server/__pycache__/app.cpython-311.pyc"):
        assert dockerignored(path, patterns), path
    for source in copied_sources():
        files = [p for p in (ROOT / source).rglob("*.py")] if (ROOT / source).is_dir() else [
            ROOT / source]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert "__pycache__" in relative or not dockerignored(relative, patterns), relative


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec, inside flwr's build
def test_node_data_and_keys_stay_out_of_the_app_bundle() -> None:
    from flwr.cli.build import build_fab_from_files

    files: dict[str, bytes | Path] = {
        "pyproject.toml": ROOT / "pyproject.toml", ".gitignore": ROOT / ".gitignore",
        "server/__init__.py": b"", "docker-compose.yml": COMPOSE,
        "deploy/data/supernode-0/news.jsonl": b'{"text": "private", "label": 0}\n',
        "deploy/data/superlink/news.json": b"[]",
        "deploy/certs/notes.json": b"{}",
    }
    fab, _ = build_fab_from_files(files)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert {"server/__init__.py", "docker-compose.yml"} <= names
    assert not [n for n in names if n.startswith("deploy/")], names


# --- the compose commands, run ------------------------------------------------------------------


def executable(name: str) -> str | None:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else shutil.which(name)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Started:
    """A process started in its own session; stopping it signals its whole group."""

    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        import psutil

        if self.process.poll() is not None:
            return
        try:  # what it launched: flower-superexec runs in a session of its own
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        for child in alive:
            child.kill()
        psutil.wait_procs(alive, timeout=10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def started() -> Iterator[Callable[..., Started]]:
    processes: list[Started] = []

    def start(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> Started:
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                       start_new_session=True)
        processes.append(Started(process, log))
        return processes[-1]

    yield start
    for item in reversed(processes):
        item.stop()


def wait_for(check: Callable[[], bool], what: str, process: Started, seconds: float = 120,
             ) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert process.process.poll() is None, f"{what}: the process ended\n{process.tail()}"
        assert time.monotonic() < deadline, f"{what}: not in {seconds} s\n{process.tail()}"
        time.sleep(0.5)


def mapped(argv: list[str], replacements: Mapping[str, str]) -> list[str]:
    out = []
    for word in argv:
        for old, new in replacements.items():
            word = word.replace(old, new)
        out.append(word)
    return out


@pytest.mark.e2e
def test_compose_commands_and_healthchecks_run(tmp_path: Path, started: Callable[..., Started],
                                               ) -> None:
    """The compose file's own commands on 127.0.0.1, its container paths mapped to files."""
    programs = {name: executable(name) for name in ("flower-superlink", "flower-supernode",
                                                    "flwr")}
    if not all(programs.values()):
        pytest.skip("flower-superlink / flower-supernode / flwr are not installed here")
    hosts = option(readme_certs_command(), "--hosts").split(",")
    material = write_deployment_material(tmp_path / "certs", hosts=hosts, num_nodes=3, days=1)
    compose = load([COMPOSE], "python", {"FEDLORA_CERTS_DIR": str(material.folder)})
    state = tmp_path / "state"
    state.mkdir()
    port, runtime_port = free_port(), free_port()
    paths = {target: str(source) for name in compose.services
             for target, source in compose.secret_files(name).items()}
    replacements = {**paths, "/app/state": str(state), "superlink:8000": f"127.0.0.1:{port}",
                    ":8000/": f":{port}/", ":9094/": f":{runtime_port}/"}
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink.fedlora]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{material.ca_cert}"\n')
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(flwr_home)}

    def healthy(service: str) -> bool:
        test = mapped(compose.services[service]["healthcheck"]["test"], replacements)
        assert test[:2] == ["CMD", "python"]
        return subprocess.run([sys.executable, *test[2:]], capture_output=True,
                              timeout=30).returncode == 0

    def flwr(*words: str) -> dict[str, Any]:
        done = subprocess.run([str(programs["flwr"]), *words, "--format", "json"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return dict(json.loads(done.stdout[done.stdout.index("{"):]))

    def start_superlink(log: str) -> Started:
        argv = mapped(compose.services["superlink"]["command"], replacements)
        argv[argv.index("--port") + 1] = str(port)
        return started([str(programs["flower-superlink"]), *argv[1:]], tmp_path / log, env,
                       tmp_path)

    superlink = start_superlink("superlink.log")
    wait_for(lambda: healthy("superlink"), "SuperLink healthcheck", superlink)
    assert (state / "state.db").is_file()  # the database is where the volume is mounted
    # subprocess isolation: the SuperLink's own SuperExec holds a TLS connection to it,
    # verified with the CA against the certificate's 127.0.0.1 (a failed handshake retries)
    import psutil

    def superexec_connected() -> bool:
        assert "CERTIFICATE_VERIFY_FAILED" not in superlink.tail(), superlink.tail()
        for child in psutil.Process(superlink.process.pid).children():
            if "flower-superexec" in " ".join(child.cmdline()):
                return any(c.status == psutil.CONN_ESTABLISHED and c.raddr
                           and c.raddr.port == port for c in child.net_connections())
        return False

    wait_for(superexec_connected, "SuperExec connected", superlink)
    time.sleep(3)  # a few polls of the Runtime API
    assert superexec_connected()
    assert "Connection attempt failed" not in superlink.tail(), superlink.tail()

    assert flwr("supernode", "register", str(material.node_public_keys[0]), "fedlora")[
        "success"] is True
    argv = mapped(compose.services["supernode-0"]["command"], replacements)
    node = started([str(programs["flower-supernode"]), *argv[1:], "--port", str(runtime_port)],
                   tmp_path / "supernode.log", env, tmp_path)

    def online() -> bool:
        nodes = flwr("supernode", "list", "fedlora")["nodes"]
        return bool(nodes) and nodes[0]["status"] == "online"

    wait_for(online, "SuperNode online", node)
    wait_for(lambda: healthy("supernode-0"), "SuperNode healthcheck", node)

    # a restarted SuperLink still knows the registered node: the state is in the volume
    node.stop()
    superlink.stop()
    superlink = start_superlink("superlink-restarted.log")
    wait_for(lambda: healthy("superlink"), "restarted SuperLink healthcheck", superlink)
    assert len(flwr("supernode", "list", "fedlora")["nodes"]) == 1
