"""TLS and SuperNode-authentication material for a Flower 1.42 deployment of fedlora.

Why one module of about 700 lines: it is one command's material (CA, TLS, SuperNode
keys, payload keys, the compose secrets) and its checks; each writer is short, and an
operator auditing what a deployment trusts reads one file.

``fedlora certs`` (:func:`write_deployment_material`) writes everything an operator needs
into one folder and prints how to use it (:func:`usage_text`).

What the installed Flower 1.42 expects (read from its source and ``--help``):

* **SuperLink TLS.** ``flower-superlink`` serves the Fleet, Control and Runtime APIs as
  *one* HTTPS server (uvicorn) on ``--host``/``--port`` (defaults ``127.0.0.1`` and
  ``8000``; the ``--fleet-api-address`` and ``--control-api-address`` flags are
  deprecated). TLS is on unless ``--insecure``; it then needs all three of
  ``--ssl-ca-certfile`` (CA certificate, PEM), ``--ssl-certfile`` (server certificate,
  PEM) and ``--ssl-keyfile`` (server private key, unencrypted PEM), each a file of its
  own: no combined bundle is read (``flwr.common.args.try_obtain_server_certificates``;
  uvicorn gets ``ssl_certfile`` and ``ssl_keyfile``). In the default ``subprocess``
  isolation the SuperLink starts ``flower-superexec``, which connects back to the
  Runtime API at ``127.0.0.1:<port>`` when bound to ``0.0.0.0`` (``resolve_bind_address``)
  and verifies it with the ``--ssl-ca-certfile`` CA, so the server certificate must
  also name ``127.0.0.1``/``localhost``: :func:`generate_server_cert` always adds them
  unless told not to.
* **SuperNode TLS.** ``flower-supernode --superlink HOST:PORT`` (no URL scheme) connects
  over HTTPS and verifies the SuperLink with ``--root-certificates`` (a PEM CA
  certificate or bundle; not a client certificate: there is no mTLS). The SuperNode's
  own ``--ssl-certfile``/``--ssl-keyfile``/``--ssl-ca-certfile`` are for its *local*
  Runtime API (``--host``/``--port``, default ``127.0.0.1:9094``), not for the link.
* **SuperNode authentication.** ``flower-superlink --enable-supernode-auth`` (refused
  together with ``--insecure``). The old CSV of authorised keys
  (``--auth-list-public-keys``) is *rejected* in 1.42 ("no longer supported"): the
  operator registers each SuperNode's public key with the Flower CLI,
  ``flwr supernode register <public-key-file> [<connection>]``, which reads the file
  with ``load_ssh_public_key`` (OpenSSH public format) and accepts only EC keys on a
  NIST curve (P-192 to P-521; ``uses_nist_ec_curve``). With authentication on, the
  Fleet API refuses self-registration, so a node must be registered *before* it starts.
  ``flower-supernode --auth-supernode-private-key <file>`` loads the key with
  ``load_ssh_private_key(data, None)``: an *unencrypted OpenSSH* private key
  (``-----BEGIN OPENSSH PRIVATE KEY-----``), not PKCS#8 PEM, and it must be an EC key.
  The public key is derived from it (``--auth-supernode-public-key`` is deprecated).
  Every Fleet request is then signed (ECDSA-SHA256 over a timestamp) and checked
  against the registered key. Flower itself generates SECP384R1 keys
  (``flwr.supercore.primitives.asymmetric.generate_key_pairs``); so do we.
* **The ``flwr`` CLI** (``flwr run``, ``flwr supernode ...``) reads connections from
  ``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``), a table
  ``[superlink.<name>]`` with ``address = "HOST:PORT"`` (the same port: the Control API
  shares it) and ``root-certificates = "<path to CA PEM>"``; ``flwr run . <name>``.

* **App bundles are not signed.** ``flower-supernode --trusted-entities <yaml>`` makes a
  SuperNode refuse every FAB without a verification record signed by one of the listed
  Ed25519 keys (``flwr.supernode.start_client_internal._pull_and_store_message`` and
  ``_verify_fab``), but those records only ever come from Flower Hub: the Control API's
  ``start_run`` (``flwr.superlink.servicer.control.control_handlers``) stores a FAB
  uploaded by ``flwr run .`` with empty ``verifications`` (whatever the request carries),
  and only ``_get_remote_fab`` (``POST $FLWR_SUPERGRID_API_URL/hub/fetch-fab``) fills
  them; ``flwr app review`` signs a Hub app and submits the signature to Flower Hub. So a
  SuperNode with trusted entities refuses every ``flwr run .`` of this repository, and
  one without them runs any FAB the SuperLink hands it. What reaches the SuperLink's port
  can therefore start code on every SuperNode (the Control API has no authentication
  without Flower's enterprise OIDC plugin): publish the port only to the SuperNodes.

Beside the transport material, ``fedlora certs`` writes what fedlora's own payload layer
(:mod:`privacy.flower`) needs: the ServerApp's long-term X25519 key
(``server-payload.key``, run config ``server-key-file``) and its fingerprint
(``server-payload.pin``, what each node pins: node config ``server-pin-file`` or
``server-key-pin``), one Ed25519 key per node that signs its handshakes
(``client-<i>.key``, node config ``client-key-file``) and the list of those public keys
the ServerApp admits (``allowed-clients.txt``, run config ``client-keys-file``).

Files written (see :class:`DeploymentMaterial`): ``ca.crt``, ``ca.key``, ``server.crt``,
``server.key``, ``server-payload.key``, ``server-payload.pin``, ``allowed-clients.txt``,
``supernode-<i>.key``, ``supernode-<i>.pub`` and ``client-<i>.key``. Private keys are
created with mode 0600 (never readable by others, even for a moment) and every file is
written atomically (temporary file in the same folder, then ``os.replace``). The CA and
server keys are ECDSA P-384 certificates signed with SHA-384.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.client_keys import ClientIdentity, write_allowed_clients
from privacy.files import write_atomic
from privacy.keys import ServerIdentity

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
FOLDER_MODE = 0o700
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
_LOOPBACK_NAMES = (*LOOPBACK_HOSTS, "::1")
DEFAULT_SUPERLINK_PORT = 8000
DEFAULT_SUPERNODE_RUNTIME_PORT = 9094
DEFAULT_CONNECTION = "fedlora"
DEFAULT_MAX_LORA_RANK = 16
DEFAULT_DP_MAX_EPSILON = 10.0  # client.policy.DEFAULT_MAX_EPSILON, stated explicitly

#: node-config keys (``--node-config``) of the ClientApp that the usage text sets
#: (privacy.flower, client.dp, client.ranks read them; tests check the names agree)
NODE_CLIENT_KEY_FILE = "client-key-file"
NODE_SERVER_KEY_PIN = "server-key-pin"
NODE_SERVER_PIN_FILE = "server-pin-file"
NODE_REQUIRE_ENCRYPTION = "require-encryption"
NODE_DP_LEDGER_FILE = "dp-ledger-file"
NODE_MAX_LORA_RANK = "max-lora-rank"
NODE_DP_MAX_EPSILON = "dp-max-epsilon"
#: run-config keys (``flwr run --run-config``) of the ServerApp (server.run reads them)
RUN_SERVER_KEY_FILE = "server-key-file"
RUN_CLIENT_KEYS_FILE = "client-keys-file"

# Validity starts a little in the past, so that a peer whose clock is slightly behind
# does not reject a certificate issued a moment ago.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_SIGNATURE_HASH = hashes.SHA384
_DNS_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - _CLOCK_SKEW, now + datetime.timedelta(days=days)


def generate_ca(*, common_name: str = "fedlora deployment CA",
                days: int = 365) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed certificate authority for one deployment.

    Args:
        common_name: the CA's subject common name.
        days: validity in days, from now.

    Returns:
        ``(key, cert)``: an ECDSA P-384 key and its CA certificate (basic constraints
        ``CA:TRUE, pathlen:0``, key usage keyCertSign and cRLSign, both critical).

    Raises:
        ValueError: ``days`` is not a positive integer or ``common_name`` is empty.

    """
    _check_days(days)
    if not common_name or len(common_name) > 64:
        raise ValueError("common_name must have 1 to 64 characters")
    key = _tls_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora")])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, _SIGNATURE_HASH())
    )
    return key, cert


def _general_name(host: str) -> x509.GeneralName:
    """A subject alternative name for a host: an IP address or a DNS name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            raise ValueError(f"'{host}' is a bind-all address, not one a client connects to; "
                             "name the address or DNS name clients use")
        return x509.IPAddress(address)
    if not text.isascii():
        raise ValueError(f"host '{host}': write an internationalised name in its "
                         "ASCII (punycode) form")
    labels = text.rstrip(".").split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]  # a wildcard is allowed as the whole leftmost label
    if len(text) > 253 or not labels or not all(_DNS_LABEL.match(lab) for lab in labels):
        raise ValueError(f"'{host}' is neither an IP address nor a DNS name "
                         "(give hosts without a port or scheme)")
    return x509.DNSName(text.rstrip(".").lower())


def normalise_hosts(hosts: Iterable[str], *, include_loopback: bool = True) -> list[str]:
    """The hosts a server certificate names, validated, in order, without duplicates.

    Args:
        hosts: DNS names and/or IP addresses (IPv6 with or without brackets).
        include_loopback: add ``localhost`` and ``127.0.0.1`` (first) when missing.

    Returns:
        The hosts as they go into the certificate (DNS names lower-cased, IPs canonical).

    Raises:
        ValueError: a host is malformed or bind-all (``0.0.0.0``, ``::``), or none is left.

    """
    candidates = [*LOOPBACK_HOSTS, *hosts] if include_loopback else list(hosts)
    seen: dict[str, None] = {}
    for host in candidates:
        if not str(host).strip():
            continue
        name = _general_name(str(host))
        seen.setdefault(str(name.value), None)
    if not seen:
        raise ValueError("the server certificate needs at least one host")
    return list(seen)


def generate_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, hosts: Sequence[str],
    days: int = 365, include_loopback: bool = True,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue the SuperLink's TLS server certificate from the deployment CA.

    Args:
        ca_key: the CA's private key.
        ca_cert: the CA's certificate (the issuer).
        hosts: every name clients use to reach the SuperLink: DNS names and IP addresses.
        days: validity in days (cut to the CA's own end of validity).
        include_loopback: also name ``localhost`` and ``127.0.0.1`` (needed by the
            SuperExec that a SuperLink in subprocess isolation starts on the same host).

    Returns:
        ``(key, cert)``: an ECDSA P-384 key and a certificate with a subject alternative
        name for every host, ``CA:FALSE`` basic constraints and digitalSignature key usage
        (both critical), serverAuth extended key usage and key identifiers.

    Raises:
        ValueError: a malformed host, no host, or ``days`` not a positive integer.

    """
    _check_days(days)
    names = [_general_name(host) for host in
             normalise_hosts(hosts, include_loopback=include_loopback)]
    key = _tls_key()
    public_hosts = [str(n.value) for n in names if str(n.value) not in LOOPBACK_HOSTS]
    common_name = (public_hosts or [str(names[0].value)])[0][:64]
    not_before, not_after = _validity(days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, _SIGNATURE_HASH())
    )
    return key, cert


def generate_node_keys(n: int) -> list[tuple[ec.EllipticCurvePrivateKey,
                                             ec.EllipticCurvePublicKey]]:
    """Key pairs for SuperNode authentication, as Flower 1.42 generates them (SECP384R1).

    Serialise them with :func:`node_private_key_bytes` (for
    ``flower-supernode --auth-supernode-private-key``) and :func:`node_public_key_bytes`
    (for ``flwr supernode register``).

    Args:
        n: how many key pairs.

    Returns:
        ``n`` ``(private_key, public_key)`` pairs on the NIST P-384 curve.

    Raises:
        ValueError: ``n`` is negative or not an integer.

    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of node keys must be an integer >= 0, got {n!r}")
    pairs = []
    for _ in range(n):
        private_key = ec.generate_private_key(ec.SECP384R1())
        pairs.append((private_key, private_key.public_key()))
    return pairs


def node_private_key_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """A SuperNode private key as unencrypted OpenSSH (what ``load_ssh_private_key`` reads)."""
    return private_key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption())


def node_public_key_bytes(public_key: ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    """A SuperNode public key as one OpenSSH line (what ``load_ssh_public_key`` reads).

    Args:
        public_key: the node's EC public key.
        comment: an optional trailing comment (e.g. ``fedlora-supernode-0``), no spaces.

    """
    line = public_key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH)
    if comment:
        if any(ch.isspace() for ch in comment):
            raise ValueError("the key comment must not contain whitespace")
        line += b" " + comment.encode("ascii")
    return line + b"\n"


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DeploymentMaterial:
    """Where :func:`write_deployment_material` put each file (absolute paths).

    Attributes:
        folder: the folder holding everything.
        ca_cert: ``ca.crt``, the CA certificate (PEM): ``--ssl-ca-certfile`` of the
            SuperLink, ``--root-certificates`` of every SuperNode, ``root-certificates`` of
            the ``flwr`` CLI connection.
        ca_key: ``ca.key``, the CA private key (PKCS#8 PEM, 0600); keep it offline.
        server_cert: ``server.crt``, the SuperLink certificate (PEM), ``--ssl-certfile``.
        server_key: ``server.key``, its private key (PKCS#8 PEM, 0600), ``--ssl-keyfile``.
        node_keys: ``supernode-<i>.key``, unencrypted OpenSSH EC P-384 private keys (0600),
            ``--auth-supernode-private-key`` of SuperNode ``i``.
        node_public_keys: ``supernode-<i>.pub``, OpenSSH public keys, given to
            ``flwr supernode register``.
        hosts: the names the server certificate is valid for, in order.
        server_payload_key: ``server-payload.key``, the ServerApp's long-term X25519
            payload key (PKCS#8 PEM, 0600), run config ``server-key-file``.
        server_payload_pin: ``server-payload.pin``, that key's SHA-256 fingerprint (one
            line of hex): what every node pins (node config ``server-pin-file`` pointing
            at a copy, or ``server-key-pin=<fingerprint>``).
        client_keys: ``client-<i>.key``, node ``i``'s Ed25519 key that signs its payload
            handshakes (PKCS#8 PEM, 0600), node config ``client-key-file``.
        allowed_clients: ``allowed-clients.txt``, the public halves of ``client_keys``
            (``ed25519:<hex> fedlora-client-<i>`` lines), run config ``client-keys-file``.

    """

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]
    hosts: tuple[str, ...]
    server_payload_key: Path
    server_payload_pin: Path
    client_keys: tuple[Path, ...]
    allowed_clients: Path

    @classmethod
    def in_folder(cls, folder: Path, *, num_nodes: int,
                  hosts: Sequence[str] = ()) -> DeploymentMaterial:
        """The layout of a deployment folder (nothing is read or written)."""
        folder = Path(folder).expanduser().resolve()
        return cls(
            folder=folder, ca_cert=folder / "ca.crt", ca_key=folder / "ca.key",
            server_cert=folder / "server.crt", server_key=folder / "server.key",
            node_keys=tuple(folder / f"supernode-{i}.key" for i in range(num_nodes)),
            node_public_keys=tuple(folder / f"supernode-{i}.pub" for i in range(num_nodes)),
            hosts=tuple(hosts),
            server_payload_key=folder / "server-payload.key",
            server_payload_pin=folder / "server-payload.pin",
            client_keys=tuple(folder / f"client-{i}.key" for i in range(num_nodes)),
            allowed_clients=folder / "allowed-clients.txt",
        )

    @property
    def num_nodes(self) -> int:
        """How many SuperNode key pairs there are."""
        return len(self.node_keys)

    @property
    def private_files(self) -> tuple[Path, ...]:
        """The files that must stay secret (mode 0600)."""
        return (self.ca_key, self.server_key, self.server_payload_key, *self.node_keys,
                *self.client_keys)

    @property
    def server_files(self) -> tuple[Path, ...]:
        """What the SuperLink's host needs (the ServerApp runs there): never ``ca.key``."""
        return (self.ca_cert, self.server_cert, self.server_key, self.server_payload_key,
                self.allowed_clients)

    def node_files(self, i: int) -> tuple[Path, ...]:
        """What node ``i``'s host needs, and nothing else of the folder."""
        return (self.ca_cert, self.node_keys[i], self.client_keys[i], self.server_payload_pin)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file, in the order they are listed to the operator."""
        nodes = [p for triple in zip(self.node_keys, self.node_public_keys, self.client_keys,
                                     strict=True) for p in triple]
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key,
                self.server_payload_key, self.server_payload_pin, self.allowed_clients, *nodes)

    def server_fingerprint(self) -> str:
        """The payload key's fingerprint, as ``server-payload.pin`` holds it."""
        return self.server_payload_pin.read_text().strip()


def write_deployment_material(folder: Path, *, hosts: Sequence[str], num_nodes: int,
                              days: int = 365, overwrite: bool = False,
                              include_loopback: bool = True) -> DeploymentMaterial:
    """Generate and write a deployment's CA, certificates, SuperNode keys and payload keys.

    Args:
        folder: where to write (created, mode 0700, when missing).
        hosts: the SuperLink's DNS names and IP addresses as SuperNodes and the ``flwr``
            CLI reach it; ``localhost`` and ``127.0.0.1`` are added unless
            ``include_loopback`` is false.
        num_nodes: how many nodes (``supernode-0`` ... ``supernode-<n-1>``): each gets a
            SuperNode key pair and a payload signing key (``client-<i>.key``).
        days: validity of the CA and the server certificate.
        overwrite: replace existing material; otherwise nothing is written if any of the
            files exists.
        include_loopback: see ``hosts``.

    Returns:
        The paths of everything written.

    Raises:
        FileExistsError: some of the files exist and ``overwrite`` is false.
        ValueError: a malformed host, ``days`` or ``num_nodes``.

    """
    _check_days(days)
    names = normalise_hosts(hosts, include_loopback=include_loopback)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise ValueError(f"num_nodes must be an integer >= 0, got {num_nodes!r}")
    material = DeploymentMaterial.in_folder(Path(folder), num_nodes=num_nodes, hosts=names)
    existing = [p for p in material.files if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        listed = ", ".join(p.name for p in existing)
        raise FileExistsError(f"{material.folder} already holds {listed}; "
                              "pass overwrite=True (fedlora certs --overwrite) to replace them")
    if not material.folder.exists():
        material.folder.mkdir(parents=True, mode=FOLDER_MODE)
    node_pairs = generate_node_keys(num_nodes)
    ca_key, ca_cert = generate_ca(days=days)
    server_key, server_cert = generate_server_cert(ca_key, ca_cert, hosts=names, days=days,
                                                   include_loopback=include_loopback)
    payload_key = ServerIdentity.generate()
    clients = [ClientIdentity.generate() for _ in range(num_nodes)]
    write_atomic(material.ca_key, _pem_private_key(ca_key), PRIVATE_KEY_MODE)
    write_atomic(material.ca_cert, _pem_cert(ca_cert), PUBLIC_FILE_MODE)
    write_atomic(material.server_key, _pem_private_key(server_key), PRIVATE_KEY_MODE)
    write_atomic(material.server_cert, _pem_cert(server_cert), PUBLIC_FILE_MODE)
    payload_key.save(material.server_payload_key, overwrite=True)
    write_atomic(material.server_payload_pin, (payload_key.fingerprint() + "\n").encode(),
                 PUBLIC_FILE_MODE)
    for i, (private_key, public_key) in enumerate(node_pairs):
        write_atomic(material.node_keys[i], node_private_key_bytes(private_key),
                      PRIVATE_KEY_MODE)
        write_atomic(material.node_public_keys[i],
                      node_public_key_bytes(public_key, f"fedlora-supernode-{i}"),
                      PUBLIC_FILE_MODE)
        clients[i].save(material.client_keys[i], overwrite=True)
    write_allowed_clients(material.allowed_clients,
                          [(c.public_key_bytes, f"fedlora-client-{i}")
                           for i, c in enumerate(clients)])
    _fsync_folder(material.folder)
    return material


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _superlink_host(hosts: Sequence[str]) -> str:
    """The name clients should use: the first non-loopback host, else 127.0.0.1."""
    for host in hosts:
        if host not in _LOOPBACK_NAMES:
            return host
    return "127.0.0.1" if "127.0.0.1" in hosts or not hosts else hosts[0]


def _quoted(value: object) -> str:
    """A string node/run-config value, single-quoted (Flower parses values as TOML)."""
    text = str(value)
    if "'" in text or "\n" in text:
        raise ValueError(f"{text!r}: a config value cannot hold a single quote or a newline")
    return f"'{text}'"


def node_config_text(material: DeploymentMaterial, i: int, *,
                     dp_ledger_file: str | None = None,
                     max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> str:
    """Node ``i``'s ``--node-config``: its partition and the settings that protect it.

    ``client-key-file`` (its handshake signing key), ``server-key-pin`` (the payload key's
    fingerprint), ``require-encryption=true``, ``dp-ledger-file`` (its DP ledger, kept
    across runs; default ``~/.local/state/fedlora/supernode-<i>/dp-ledger.json``),
    ``max-lora-rank`` and ``dp-max-epsilon`` (the node's cap on its cumulative epsilon,
    stated although it is the default, so that the operator sees it).

    Raises:
        ValueError: ``max_lora_rank`` is not a positive integer, or a path holds a quote.

    """
    if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or \
            max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be an integer >= 1, got {max_lora_rank!r}")
    try:
        pin = material.server_fingerprint()
    except OSError:
        pin = "<fingerprint in server-payload.pin>"
    ledger = dp_ledger_file or f"~/.local/state/fedlora/supernode-{i}/dp-ledger.json"
    return " ".join([
        f"partition-id={i} num-partitions={material.num_nodes}",
        f"{NODE_CLIENT_KEY_FILE}={_quoted(material.client_keys[i])}",
        f"{NODE_SERVER_KEY_PIN}={_quoted(pin)}",
        f"{NODE_REQUIRE_ENCRYPTION}=true",
        f"{NODE_DP_LEDGER_FILE}={_quoted(ledger)}",
        f"{NODE_MAX_LORA_RANK}={max_lora_rank}",
        f"{NODE_DP_MAX_EPSILON}={DEFAULT_DP_MAX_EPSILON:g}",
    ])


def run_config_text(material: DeploymentMaterial) -> str:
    """The ``--run-config`` that gives the ServerApp its payload key and admitted clients."""
    return (f"{RUN_SERVER_KEY_FILE}={_quoted(material.server_payload_key)} "
            f"{RUN_CLIENT_KEYS_FILE}={_quoted(material.allowed_clients)}")


def usage_text(material: DeploymentMaterial, *, port: int = DEFAULT_SUPERLINK_PORT,
               connection: str = DEFAULT_CONNECTION,
               max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> str:
    """How to start a TLS, authenticated Flower 1.42 deployment of fedlora with ``material``.

    Args:
        material: what :func:`write_deployment_material` wrote.
        port: the SuperLink's port (Fleet, Control and Runtime APIs share it).
        connection: the name of the ``flwr`` CLI connection in ``~/.flwr/config.toml``.
        max_lora_rank: the rank cap each node declares (``max-lora-rank``).

    Returns:
        Text listing every file and the commands, in the order to run them.

    """
    host = _superlink_host(material.hosts)
    address = _host_port(host, port)
    bind = {"::1": "::1"}.get(host, "127.0.0.1") if host in _LOOPBACK_NAMES else "0.0.0.0"
    n = material.num_nodes
    width = max(len(p.name) for p in material.files)
    try:
        pin = material.server_fingerprint()
    except OSError:
        pin = "(not written)"
    lines = [
        f"Deployment material in {material.folder}",
        "",
        f"  {material.ca_cert.name:<{width}}  CA certificate: SuperLink, every SuperNode and "
        "the flwr CLI",
        f"  {material.ca_key.name:<{width}}  CA private key (0600): keep it offline; it only "
        "issues server certificates",
        f"  {material.server_cert.name:<{width}}  SuperLink TLS certificate for "
        + ", ".join(material.hosts),
        f"  {material.server_key.name:<{width}}  SuperLink TLS private key (0600): SuperLink "
        "host only",
        f"  {material.server_payload_key.name:<{width}}  ServerApp payload key (X25519, 0600): "
        "SuperLink host only",
        f"  {material.server_payload_pin.name:<{width}}  its fingerprint, which every node "
        f"pins: {pin}",
        f"  {material.allowed_clients.name:<{width}}  the node keys the ServerApp admits "
        "(client-<i>.key's public halves)",
    ]
    for i, (key, pub, client) in enumerate(zip(material.node_keys, material.node_public_keys,
                                               material.client_keys, strict=True)):
        lines.append(f"  {key.name:<{width}}  SuperNode {i} private key (ECDSA P-384, "
                     f"OpenSSH, 0600): node {i} only")
        lines.append(f"  {pub.name:<{width}}  SuperNode {i} public key (OpenSSH): to "
                     "register it")
        lines.append(f"  {client.name:<{width}}  node {i} payload signing key (Ed25519, "
                     f"0600): node {i} only")
    lines += [
        "",
        "The SuperLink host needs " + ", ".join(p.name for p in material.server_files[:-1])
        + " and",
        f"{material.server_files[-1].name}; node i only ca.crt, supernode-<i>.key, "
        "client-<i>.key and server-payload.pin.",
        "",
        "1. Start the SuperLink with TLS and SuperNode authentication:",
        "",
        "   flower-superlink \\",
        f"       --ssl-ca-certfile {material.ca_cert} \\",
        f"       --ssl-certfile {material.server_cert} \\",
        f"       --ssl-keyfile {material.server_key} \\",
        "       --enable-supernode-auth \\",
        "       --disable-runtime-dependency-installation \\",
        f"       --host {bind} --port {port}",
        "",
        "   (add --database <file>.db to keep registered SuperNodes across restarts; the",
        "   last flag stops Flower from installing the app's dependencies per run, which",
        "   would pull an unpinned torch: install with constraints.txt beforehand)",
        "",
        f"   Port {port} also serves Flower's Control API, which has no authentication in",
        "   Flower 1.42 (only the enterprise OIDC plugin adds it), and SuperNodes run any app",
        "   bundle they are handed: whoever reaches this port can run code on the SuperLink",
        "   and on every SuperNode. Let only the SuperNodes and operators reach it",
        "   (firewall); operators elsewhere can use an SSH tunnel to the SuperLink host.",
        "",
        "2. Add the SuperLink to the flwr CLI: in ~/.flwr/config.toml (or "
        "$FLWR_HOME/config.toml)",
        "",
        f"   [superlink.{connection}]",
        f'   address = "{address}"',
        f'   root-certificates = "{material.ca_cert}"',
        "",
    ]
    if n:
        lines += ["3. Register each SuperNode's public key (before that SuperNode starts):", ""]
        lines += [f"   flwr supernode register {pub} {connection}"
                  for pub in material.node_public_keys]
        lines += [f"   flwr supernode list {connection}", ""]
        lines += ["4. Start each SuperNode on its machine, with copies of its files there "
                  "(adjust the", "   paths):", ""]
        for i, key in enumerate(material.node_keys):
            config = node_config_text(material, i, max_lora_rank=max_lora_rank)
            lines += [
                "   flower-supernode \\",
                f"       --superlink {address} \\",
                f"       --root-certificates {material.ca_cert} \\",
                f"       --auth-supernode-private-key {key} \\",
                f'       --node-config "{config}" \\',
                f"       --port {DEFAULT_SUPERNODE_RUNTIME_PORT + i}",
                "",
            ]
        lines += [
            "   (--port is the SuperNode's local Runtime API on 127.0.0.1; distinct ports let",
            "   several SuperNodes share one machine. The node config: client-key-file signs",
            "   the node's payload handshakes; server-key-pin is the ServerApp's key the node",
            "   accepts (or server-pin-file=<copy of server-payload.pin>); require-encryption",
            "   refuses plaintext payloads; dp-ledger-file keeps the node's DP spending across",
            "   runs; max-lora-rank caps the rank the server may ask of it; dp-max-epsilon caps",
            "   its cumulative epsilon (client/policy.py lists the node's other bounds).)",
            "",
        ]
    else:
        lines += ["3./4. No SuperNode keys were generated (--nodes 0): write some with "
                  "fedlora certs --nodes N.", ""]
    lines += [
        "5. Run fedlora on the deployment, from the project folder (the ServerApp runs on the",
        "   SuperLink host and reads these files there):",
        "",
        f'   flwr run . {connection} --stream --run-config "{run_config_text(material)}"',
    ]
    return "\n".join(lines) + "\n"
