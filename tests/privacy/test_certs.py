"""Deployment material for Flower 1.42: CA, SuperLink TLS certificate, SuperNode keys."""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import ssl
import stat
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from flwr.common.config import parse_config_args

from privacy import certs
from privacy.certs import (
    DeploymentMaterial,
    generate_ca,
    generate_node_keys,
    generate_server_cert,
    node_private_key_bytes,
    node_public_key_bytes,
    usage_text,
    write_deployment_material,
)
from privacy.client_keys import AllowedClients, ClientIdentity, handshake_transcript
from privacy.keys import ServerIdentity, verify_pinned
from tests.deployment.processes import (
    Processes,
    executable,
    flower_env,
    free_port,
    https_get,
    json_of,
    run_flwr,
    tail,
)

HOSTS = ["superlink", "fedlora.example.org", "10.1.2.3", "2001:db8::7"]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return generate_ca(common_name="test CA", days=30)


@pytest.fixture(scope="module")
def server(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
           ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return generate_server_cert(*ca, hosts=HOSTS, days=30)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> DeploymentMaterial:
    folder = tmp_path_factory.mktemp("deploy") / "certs"
    return write_deployment_material(folder, hosts=["superlink", "10.0.0.5"], num_nodes=3,
                                     days=10)


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (san.get_values_for_type(x509.DNSName),
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


# --- certificates -------------------------------------------------------------------------


def test_ca_is_a_ca_and_server_cert_is_not(ca, server) -> None:
    ca_constraints = ca[1].extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.critical and ca_constraints.value.ca
    assert ca[1].extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    constraints = server[1].extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = server[1].extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = server[1].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(server[0].curve, ec.SECP384R1)
    assert server[1].not_valid_after_utc <= ca[1].not_valid_after_utc


def test_server_cert_verifies_against_the_ca(ca, server) -> None:
    server[1].verify_directly_issued_by(ca[1])
    verifier = PolicyBuilder().store(Store([ca[1]]))
    for name in (x509.DNSName("superlink"), x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.IPAddress(ipaddress.ip_address("10.1.2.3"))):
        chain = verifier.build_server_verifier(name).verify(server[1], [])
        assert chain[-1] == ca[1]
    other_ca = generate_ca(common_name="someone else", days=1)[1]
    with pytest.raises(Exception, match="(?i)issuer|signature"):
        server[1].verify_directly_issued_by(other_ca)


def test_server_cert_names_every_host_as_dns_or_ip(server) -> None:
    dns, ips = sans(server[1])
    assert dns == ["localhost", "superlink", "fedlora.example.org"]
    assert ips == ["127.0.0.1", "10.1.2.3", "2001:db8::7"]


def test_loopback_can_be_left_out_and_hosts_are_deduplicated(ca) -> None:
    _, cert = generate_server_cert(*ca, hosts=["Superlink", "superlink", "[::1]"], days=1,
                                   include_loopback=False)
    assert sans(cert) == (["superlink"], ["::1"])


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "superlink:8000", "https://superlink",
                                  "bad host", "dömain.example"])
def test_malformed_or_bind_all_hosts_are_refused(ca, host: str) -> None:
    with pytest.raises(ValueError):
        generate_server_cert(*ca, hosts=[host], days=1)


def test_days_must_be_positive(ca) -> None:
    with pytest.raises(ValueError):
        generate_ca(common_name="x", days=0)
    with pytest.raises(ValueError):
        generate_server_cert(*ca, hosts=["a"], days=-1)


# --- SuperNode keys --------------------------------------------------------------------------


def test_node_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, uses_nist_ec_curve
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    pairs = generate_node_keys(2)
    assert len(pairs) == 2 and generate_node_keys(0) == []
    for i, (private_key, public_key) in enumerate(pairs):
        assert isinstance(private_key.curve, ec.SECP384R1)
        key_file = tmp_path / f"n{i}.key"
        pub_file = tmp_path / f"n{i}.pub"
        key_file.write_bytes(node_private_key_bytes(private_key))
        pub_file.write_bytes(node_public_key_bytes(public_key, f"node-{i}"))
        assert key_file.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert pub_file.read_text().startswith("ecdsa-sha2-nistp384 ")
        # what `flower-supernode --auth-supernode-private-key` does
        loaded, derived = _try_setup_client_authentication(argparse.Namespace(
            auth_supernode_private_key=str(key_file), auth_supernode_public_key=None))
        assert loaded.private_numbers() == private_key.private_numbers()
        # what `flwr supernode register <public-key-file>` sends to the SuperLink
        registered = bytes_to_public_key(try_load_public_key(pub_file))
        assert uses_nist_ec_curve(registered)
        assert registered.public_numbers() == public_key.public_numbers()
        assert derived.public_numbers() == public_key.public_numbers()
    with pytest.raises(ValueError):
        generate_node_keys(-1)


# --- the folder ------------------------------------------------------------------------------


def test_every_file_is_written_with_private_keys_0600(material: DeploymentMaterial) -> None:
    names = sorted(p.name for p in material.folder.iterdir())
    assert names == sorted(["ca.crt", "ca.key", "server.crt", "server.key",
                            "server-payload.key", "server-payload.pin", "allowed-clients.txt"]
                           + [f"supernode-{i}.{ext}" for i in range(3) for ext in ("key", "pub")]
                           + [f"client-{i}.key" for i in range(3)])
    assert {p.name for p in material.files} == set(names)
    assert len(material.files) == len(names)
    assert set(material.private_files) == {p for p in material.files if p.suffix == ".key"}
    for path in material.private_files:
        assert mode_of(path) == 0o600, path
    for path in (material.ca_cert, material.server_cert, *material.node_public_keys,
                 material.server_payload_pin, material.allowed_clients):
        assert mode_of(path) == 0o644, path
    assert mode_of(material.folder) == 0o700
    assert material.folder.is_absolute() and material.num_nodes == 3
    ca_cert = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    server_cert = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    server_cert.verify_directly_issued_by(ca_cert)
    assert sans(server_cert) == (["localhost", "superlink"], ["127.0.0.1", "10.0.0.5"])
    assert material.hosts == ("localhost", "127.0.0.1", "superlink", "10.0.0.5")


def test_payload_keys_load_as_the_serverapp_and_the_clientapps_load_them(
        material: DeploymentMaterial) -> None:
    """server-payload.key/.pin, client-<i>.key and allowed-clients.txt fit together."""
    server = ServerIdentity.load(material.server_payload_key)
    pin = material.server_payload_pin.read_text()
    assert pin == server.fingerprint() + "\n"  # one line: what a pin file holds
    assert material.server_fingerprint() == server.fingerprint()
    verify_pinned(server.public_key_bytes, pin)
    allowed = AllowedClients.load(material.allowed_clients)
    assert len(allowed) == material.num_nodes == len(material.client_keys)
    lines = [ln for ln in material.allowed_clients.read_text().splitlines()
             if ln and not ln.startswith("#")]
    clients = [ClientIdentity.load(path) for path in material.client_keys]
    assert lines == [c.public_line(f"fedlora-client-{i}") for i, c in enumerate(clients)]
    assert len({c.public_key_bytes for c in clients}) == len(clients)
    # each key is admitted, and speaks for one node only
    for node_id, client in enumerate(clients, start=100):
        transcript = handshake_transcript(
            run_id=1, round=1, message_type="train", node_id=node_id,
            server_key=server.public_key_bytes, server_ephemeral=bytes(32),
            client_ephemeral=bytes(range(32)))
        allowed.verify(public_key=client.public_key_bytes, signature=client.sign(transcript),
                       transcript=transcript, node_id=node_id)
    stranger = ClientIdentity.generate()
    with pytest.raises(ValueError, match="not in"):
        allowed.verify(public_key=stranger.public_key_bytes, signature=stranger.sign(b"x"),
                       transcript=b"x", node_id=1)
    # what each host needs, and never the CA key
    assert material.ca_key not in material.server_files
    assert material.server_payload_key in material.server_files
    assert material.allowed_clients in material.server_files
    for i in range(material.num_nodes):
        assert set(material.node_files(i)) == {material.ca_cert, material.node_keys[i],
                                               material.client_keys[i],
                                               material.server_payload_pin}


def test_no_node_means_an_allowed_clients_file_the_server_refuses(tmp_path: Path) -> None:
    material = write_deployment_material(tmp_path / "c", hosts=[], num_nodes=0, days=1)
    assert material.allowed_clients.exists() and material.client_keys == ()
    with pytest.raises(ValueError, match="no client key"):
        AllowedClients.load(material.allowed_clients)


def test_node_and_run_config_keys_are_the_ones_the_apps_read() -> None:
    from client.dp import LEDGER_FILE_KEY
    from client.policy import DEFAULT_MAX_EPSILON, DP_KEYS
    from client.ranks import BUDGET_KEY
    from privacy import flower

    assert certs.NODE_CLIENT_KEY_FILE == flower.CLIENT_KEY_FILE_KEY
    assert certs.NODE_SERVER_KEY_PIN == flower.PIN_KEY
    assert certs.NODE_SERVER_PIN_FILE == flower.PIN_FILE_KEY
    assert certs.NODE_REQUIRE_ENCRYPTION == flower.REQUIRE_KEY
    assert certs.NODE_DP_LEDGER_FILE == LEDGER_FILE_KEY
    assert certs.NODE_MAX_LORA_RANK == BUDGET_KEY
    assert certs.NODE_DP_MAX_EPSILON in DP_KEYS
    assert certs.DEFAULT_DP_MAX_EPSILON == DEFAULT_MAX_EPSILON
    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())[
        "tool"]["flwr"]["app"]["config"]
    assert {certs.RUN_SERVER_KEY_FILE, certs.RUN_CLIENT_KEYS_FILE} <= set(declared)


def test_overwrite_is_refused_without_the_flag(tmp_path: Path) -> None:
    first = write_deployment_material(tmp_path / "c", hosts=[], num_nodes=1, days=1)
    before = {p: p.read_bytes() for p in first.files}
    with pytest.raises(FileExistsError, match="overwrite"):
        write_deployment_material(tmp_path / "c", hosts=[], num_nodes=1, days=1)
    assert {p: p.read_bytes() for p in first.files} == before
    # one existing file is enough to refuse, and nothing else is written then
    for name in ("supernode-1.pub", "allowed-clients.txt", "client-1.key"):
        lone = tmp_path / f"d-{name}"
        lone.mkdir()
        (lone / name).write_text("keep me")
        with pytest.raises(FileExistsError):
            write_deployment_material(lone, hosts=[], num_nodes=2, days=1)
        assert [p.name for p in lone.iterdir()] == [name]
    second = write_deployment_material(tmp_path / "c", hosts=[], num_nodes=1, days=1,
                                       overwrite=True)
    assert second.ca_cert.read_bytes() != before[first.ca_cert]
    assert second.server_payload_pin.read_bytes() != before[first.server_payload_pin]
    assert second.client_keys[0].read_bytes() != before[first.client_keys[0]]
    assert mode_of(second.ca_key) == 0o600 and mode_of(second.client_keys[0]) == 0o600
    assert not [p for p in second.folder.iterdir() if p.name.endswith(".tmp")]


# --- usage text ------------------------------------------------------------------------------


def commands_in(text: str) -> list[list[str]]:
    """The shell commands of a usage text (continuation lines joined)."""
    commands, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and not stripped.startswith(("flower-superlink", "flower-supernode",
                                                    "flwr ")):
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            commands.append(shlex.split(current))
            current = ""
    return commands


def connection_block(text: str, name: str = certs.DEFAULT_CONNECTION) -> str:
    """The ~/.flwr/config.toml table of a usage text."""
    lines = text.splitlines()
    start = lines.index(f"   [superlink.{name}]")
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line.strip())
    return "\n".join(block) + "\n"


def test_usage_text_mentions_every_file_and_only_real_flags(
        material: DeploymentMaterial) -> None:
    import typer
    from flwr.cli.app import app
    from flwr.cli.constant import SuperLinkConnectionTomlKey
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    text = usage_text(material)
    for path in material.files:
        assert path.name in text, path.name
    for path in (material.ca_cert, material.server_cert, material.server_key,
                 *material.node_keys, *material.node_public_keys):
        assert str(path) in text, path
    commands = commands_in(text)
    flwr_cli = typer.main.get_command(app)
    known = {"flower-superlink": set(_parse_args_run_superlink()._option_string_actions),
             "flower-supernode": set(_parse_args_run_supernode()._option_string_actions)}
    for argv in commands:
        if argv[0] == "flwr":
            command = flwr_cli
            for word in argv[1:]:
                if word not in getattr(command, "commands", {}):
                    break
                command = command.commands[word]
            options = {opt for param in command.params for opt in param.opts}
        else:
            options = known[argv[0]]
        flags = [word for word in argv if word.startswith("--")]
        assert set(flags) <= options, (argv, set(flags) - options)
    superlink = next(c for c in commands if c[0] == "flower-superlink")
    assert "--insecure" not in superlink and "--enable-supernode-auth" in superlink
    assert superlink[superlink.index("--ssl-ca-certfile") + 1] == str(material.ca_cert)
    assert superlink[superlink.index("--ssl-certfile") + 1] == str(material.server_cert)
    assert superlink[superlink.index("--ssl-keyfile") + 1] == str(material.server_key)
    registers = [c for c in commands if c[:3] == ["flwr", "supernode", "register"]]
    assert [c[3] for c in registers] == [str(p) for p in material.node_public_keys]
    nodes = [c for c in commands if c[0] == "flower-supernode"]
    assert len(nodes) == 3
    fingerprint = ServerIdentity.load(material.server_payload_key).fingerprint()
    assert fingerprint in text
    ledgers = set()
    for i, argv in enumerate(nodes):
        assert argv[argv.index("--superlink") + 1] == "superlink:8000"
        assert argv[argv.index("--root-certificates") + 1] == str(material.ca_cert)
        assert argv[argv.index("--auth-supernode-private-key") + 1] == str(material.node_keys[i])
        # the node config, as Flower parses it: partition, keys, pin and the node's bounds
        config = parse_config_args([argv[argv.index("--node-config") + 1]])
        assert config == {
            "partition-id": i, "num-partitions": 3,
            certs.NODE_CLIENT_KEY_FILE: str(material.client_keys[i]),
            certs.NODE_SERVER_KEY_PIN: fingerprint,
            certs.NODE_REQUIRE_ENCRYPTION: True,
            certs.NODE_DP_LEDGER_FILE: config[certs.NODE_DP_LEDGER_FILE],
            certs.NODE_MAX_LORA_RANK: certs.DEFAULT_MAX_LORA_RANK,
            certs.NODE_DP_MAX_EPSILON: certs.DEFAULT_DP_MAX_EPSILON,
        }
        ledgers.add(config[certs.NODE_DP_LEDGER_FILE])
        ClientIdentity.load(config[certs.NODE_CLIENT_KEY_FILE])
        verify_pinned(ServerIdentity.load(material.server_payload_key).public_key_bytes,
                      config[certs.NODE_SERVER_KEY_PIN])
    assert len(ledgers) == 3  # nodes sharing a machine keep separate ledgers
    run = next(c for c in commands if c[:2] == ["flwr", "run"])
    assert run[:5] == ["flwr", "run", ".", "fedlora", "--stream"]
    assert parse_config_args([run[run.index("--run-config") + 1]]) == {
        certs.RUN_SERVER_KEY_FILE: str(material.server_payload_key),
        certs.RUN_CLIENT_KEYS_FILE: str(material.allowed_clients)}
    toml = tomllib.loads(connection_block(text))
    assert toml == {"superlink": {"fedlora": {
        SuperLinkConnectionTomlKey.ADDRESS: "superlink:8000",
        SuperLinkConnectionTomlKey.ROOT_CERTIFICATES: str(material.ca_cert)}}}


# --- the CLI -------------------------------------------------------------------------------


def test_cli_certs_writes_the_folder_and_prints_the_usage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    out = tmp_path / "deploy" / "certs"
    argv = ["certs", "--out", str(out), "--hosts", "localhost,127.0.0.1,superlink",
            "--nodes", "3", "--days", "30"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    material = DeploymentMaterial.in_folder(
        out, num_nodes=3, hosts=certs.normalise_hosts(["localhost", "127.0.0.1", "superlink"]))
    assert printed == usage_text(material)
    assert all(p.exists() for p in material.files)
    assert 'num-partitions=3' in printed and "superlink:8000" in printed
    ca_before = material.ca_cert.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert material.ca_cert.read_bytes() == ca_before
    assert main([*argv, "--overwrite", "--max-lora-rank", "4"]) == 0
    assert material.ca_cert.read_bytes() != ca_before
    assert capsys.readouterr().out == usage_text(material, max_lora_rank=4)
    with pytest.raises(ValueError, match="max_lora_rank"):
        usage_text(material, max_lora_rank=0)


# --- a real SuperLink ----------------------------------------------------------------------


def test_superlink_serves_tls_and_accepts_a_registered_supernode(tmp_path: Path) -> None:
    """The printed commands, run for real on 127.0.0.1: TLS, registration, authentication."""
    superlink_exe, supernode_exe, flwr_exe = (executable(n) for n in (
        "flower-superlink", "flower-supernode", "flwr"))
    if not (superlink_exe and supernode_exe and flwr_exe):
        pytest.skip("flower-superlink / flower-supernode / flwr are not installed here")
    material = write_deployment_material(tmp_path / "certs", hosts=[], num_nodes=1, days=1)
    port = free_port()
    text = usage_text(material, port=port)
    commands = commands_in(text)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(connection_block(text))
    env = flower_env(flwr_home)
    superlink_cmd = next(c for c in commands if c[0] == "flower-superlink")
    assert superlink_cmd[superlink_cmd.index("--host") + 1] == "127.0.0.1"
    # process isolation: no SuperExec child (no ServerApp runs here)
    superlink_cmd = [superlink_exe, *superlink_cmd[1:], "--isolation", "process"]
    trusted = ssl.create_default_context(cafile=str(material.ca_cert))
    (tmp_path / "logs").mkdir()
    procs = Processes(logs=tmp_path / "logs", env=env, cwd=tmp_path)
    try:
        superlink = procs.start("superlink", superlink_cmd)
        deadline = time.monotonic() + 120
        while True:
            if not superlink.alive():
                output = tail(superlink.log)
                if any(word in output.lower() for word in ("ssl", "certificate", "pem", "key")):
                    pytest.fail(f"flower-superlink rejected the material:\n{output}")
                pytest.skip(f"flower-superlink cannot start here "
                            f"(exit {superlink.popen.returncode}):\n{output}")
            try:
                response = https_get(port, "/health", trusted, "localhost")
                break
            except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"flower-superlink did not answer in time:\n{tail(superlink.log)}")
                time.sleep(0.3)
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert https_get(port, "/health", trusted, "127.0.0.1").startswith(b"HTTP/1.1 200")
        stranger_ca = generate_ca(common_name="stranger", days=1)[1]
        stranger = ssl.create_default_context(
            cadata=stranger_ca.public_bytes(serialization.Encoding.PEM).decode())
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(port, "/health", stranger, "localhost")

        register = next(c for c in commands if c[:3] == ["flwr", "supernode", "register"])
        done = run_flwr(env, tmp_path, *register[1:], "--format", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        assert json_of(done.stdout)["success"] is True

        node_cmd = next(c for c in commands if c[0] == "flower-supernode")
        supernode = procs.start("supernode", [supernode_exe, *node_cmd[1:], "--isolation",
                                              "process", "--port", str(free_port())])
        deadline = time.monotonic() + 120
        status = ""
        while status != "online":
            assert supernode.alive(), tail(supernode.log)
            assert time.monotonic() < deadline, f"node not online:\n{tail(supernode.log)}"
            time.sleep(1)
            listed = run_flwr(env, tmp_path, "supernode", "list", certs.DEFAULT_CONNECTION,
                              "--format", "json")
            assert listed.returncode == 0, listed.stdout + listed.stderr
            nodes = json_of(listed.stdout)["nodes"]
            status = nodes[0]["status"] if nodes else ""
    finally:
        stragglers = procs.stop_all()
    assert stragglers == [] and procs.leftovers() == []
    assert all(not p.alive() for p in procs.started)
