"""How payloads travel between the server and its clients: each transport a named pair.

A :class:`Transport` is a server-side strategy wrapper and the ClientApp mod that
answers it. The server wraps its strategy with the run's transport; a ClientApp installs
every transport's mod (each passes through messages that are not its own, and a node's
config says what it requires: ``require-encryption``). Whatever a transport drops before
the strategy sees it is reported through one interface, :meth:`Transport.rejections`,
which the results folder records beside the strategy's own rejections.

- ``plain``: the strategy's messages as they are (payloads readable by the relay);
- ``encrypted``: adapters sealed end to end with per-round X25519 + AES-GCM keys
  (:mod:`privacy.flower`), the server key pinned by clients, client keys optionally
  admitted from ``client-keys-file``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from privacy.client_keys import AllowedClients
from privacy.files import state_dir
from privacy.flower import EncryptedStrategy, encryption_mod
from privacy.keys import ServerIdentity

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
DEFAULT_SERVER_KEY_FILE = "server-payload.key"


@dataclass(frozen=True)
class Transport:
    """A named transport: its server wrapper and its client mod.

    ``wrap(strategy, federation)`` returns the strategy the server runs (``federation``
    is the run's federation settings); ``client_mod`` is installed in every ClientApp
    (None: nothing to do on the client).
    """

    name: str
    description: str
    wrap: Callable[[Strategy, Any], Strategy]
    client_mod: Mod | None = None

    @staticmethod
    def rejections(runner: Strategy, server_round: int) -> list[tuple[int, str]]:
        """``(node, reason)`` of each reply the transport dropped in ``server_round``."""
        return list(getattr(runner, "transport_rejections", {}).get(server_round, []))

    @staticmethod
    def clients_authenticated(runner: Strategy) -> bool:
        """Whether the transport admits only listed client keys."""
        return getattr(runner, "allowed_clients", None) is not None


def load_identity(path: str) -> ServerIdentity:
    """The server's long-term payload key from ``server-key-file``.

    Empty: the key kept in the server's state folder (``<state dir>/server-payload.key``,
    see :func:`privacy.files.state_dir`), created on first use, so the key that clients
    pin on first use stays the same from run to run.
    """
    target = Path(path).expanduser() if path else state_dir() / DEFAULT_SERVER_KEY_FILE
    if not path and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        identity = ServerIdentity.generate()
        identity.save(target)
        log(INFO, "payload encryption: new server key, fingerprint %s, saved in %s",
            identity.fingerprint(), target)
        return identity
    identity = ServerIdentity.load(target)
    log(INFO, "payload encryption: server key %s, fingerprint %s", target,
        identity.fingerprint())
    return identity


def load_allowed_clients(path: str) -> AllowedClients | None:
    """The client keys admitted at the payload layer (None when ``client-keys-file`` is empty).

    Raises:
        ValueError: the file cannot be read or lists no valid key.

    """
    if not path:
        return None
    try:
        allowed = AllowedClients.load(Path(path).expanduser())
    except OSError as exc:
        raise ValueError(f"client-keys-file {path} cannot be read ({exc}); write it with "
                         "`fedlora certs` or leave client-keys-file empty") from exc
    log(INFO, "payload encryption: %d client key(s) admitted from %s", len(allowed), path)
    return allowed


def _encrypted(strategy: Strategy, federation: Any) -> Strategy:
    return EncryptedStrategy(strategy, identity=load_identity(federation.server_key_file),
                             allowed_clients=load_allowed_clients(federation.client_keys_file))


PLAIN = Transport("plain", "payloads as the strategy builds them", wrap=lambda s, _: s)
ENCRYPTED = Transport("encrypted", "adapters sealed end to end (X25519 + AES-GCM)",
                      wrap=_encrypted, client_mod=encryption_mod)
TRANSPORTS: dict[str, Transport] = {t.name: t for t in (PLAIN, ENCRYPTED)}


def transport_for(federation: Any) -> Transport:
    """The run's transport from its federation settings (``encrypt-payloads``)."""
    return ENCRYPTED if federation.encrypt_payloads else PLAIN


def client_mods() -> list[Mod]:
    """Every transport's client mod, for a ClientApp."""
    return [t.client_mod for t in TRANSPORTS.values() if t.client_mod is not None]
