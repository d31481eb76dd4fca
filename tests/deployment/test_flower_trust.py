"""What Flower 1.42 itself authenticates, checked against its own code (in process, fast).

The deployment (docker-compose.yml, ``fedlora certs``) rests on these facts; if a Flower
upgrade changes one of them, a test here fails and the README's threat model is due:

* the SuperLink serves the Fleet, Control and Runtime APIs from one web app on one port,
  so the Control API cannot be kept off the port the SuperNodes need;
* the Control API authenticates nobody unless Flower's enterprise OIDC plugin is there;
* ``flower-supernode --trusted-entities`` works, but only for app bundles whose signatures
  the SuperLink got from Flower Hub: a bundle uploaded by ``flwr run .`` is stored without
  any verification record (whatever the request carries), so a SuperNode with trusted
  entities refuses it, and a SuperNode without them runs any bundle.

The SuperLink's ``start_run`` (Control API) and the SuperNode's message intake
(``_pull_and_store_message``) run here for real, on in-memory state.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO = Path(__file__).resolve().parents[2]
TRUSTED_ID = "fpk_fedlora_reviewer"


# --- one port, no Control API authentication ---------------------------------------------------


def test_one_web_app_serves_fleet_control_and_runtime_apis() -> None:
    from fastapi.routing import APIRoute, iter_route_contexts
    from flwr.superlink.main import create_app

    app = create_app()  # what flower-superlink serves with uvicorn on --host/--port
    paths = {ctx.route.path for ctx in iter_route_contexts(app.routes)
             if isinstance(ctx.route, APIRoute)}
    for prefix in ("/v1/fleet/", "/v1/control/", "/v1/runtime/"):
        assert any(p.startswith(prefix) for p in paths), prefix
    assert "/v1/control/start-run" in paths and "/v1/fleet/pull-messages" in paths
    # a SuperNode has no option to reach a Fleet API on another port or transport
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    options = set(_parse_args_run_supernode()._option_string_actions)
    assert "--superlink" in options and not {o for o in options if "fleet" in o}


def test_the_control_api_authenticates_nobody_without_the_enterprise_plugin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink.auth_plugin import NoOpControlAuthnPlugin
    from flwr.superlink.config_loader import load_control_authn_plugin

    try:
        import flwr.ee  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - Flower Enterprise installed
        pytest.skip("Flower Enterprise is installed: OIDC may be configured")
    monkeypatch.delenv("FLWR_OIDC_ENABLED", raising=False)
    plugin = load_control_authn_plugin()
    assert isinstance(plugin, NoOpControlAuthnPlugin)
    valid, account = plugin.validate_tokens_in_metadata([])  # no token at all
    assert valid and account is not None
    # asking for OIDC stops the SuperLink: this distribution has none
    monkeypatch.setenv("FLWR_OIDC_ENABLED", "1")
    with pytest.raises(SystemExit, match="unavailable"):
        load_control_authn_plugin()


# --- app bundle signatures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fab_bytes() -> bytes:
    """An app bundle of this repository's app (its pyproject.toml), as `flwr build` makes."""
    import warnings

    from flwr.cli.build import build_fab_from_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pathspec, inside flwr's build
        fab, _ = build_fab_from_files({"pyproject.toml": REPO / "pyproject.toml",
                                       "server/__init__.py": b"", "client/__init__.py": b""})
    return fab


def hub_verification(fab: bytes, key: Ed25519PrivateKey, key_id: str = TRUSTED_ID,
                     ) -> dict[str, str]:
    """The verification record Flower Hub hands a SuperLink for a reviewed app.

    The signature is what ``flwr app review`` makes (``_sign_fab``: Ed25519 over the
    signing time and the FAB's SHA-256), in the form the SuperLink stores
    (``_format_verification``, which also adds ``valid_license``).
    """
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign
    from flwr.superlink.servicer.control.control_handlers import _format_verification

    signed_at = int(time.time())
    signature = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return _format_verification([{
        "public_key_id": key_id, "signed_at": signed_at,  # type: ignore[dict-item]
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode()}])


def trusted_entities_file(tmp_path: Path, key: Ed25519PrivateKey) -> dict[str, str]:
    """A ``--trusted-entities`` YAML file, read and checked as flower-supernode does."""
    from flwr.supernode.cli.flower_supernode import (
        _try_obtain_trusted_entities,
        _validate_public_keys_ed25519,
    )

    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    path = tmp_path / "trusted-entities.yaml"
    path.write_text(f"{TRUSTED_ID}: '{public} fedlora-reviewer'\n")
    entities = _try_obtain_trusted_entities(path)
    assert entities is not None
    _validate_public_keys_ed25519(entities)
    return entities


def start_run_as_flwr_run(fab: bytes, verifications: dict[str, str]) -> Any:
    """``flwr run .`` against a real Control API handler: the bundle the SuperLink stores."""
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.fab_pb2 import Fab as ProtoFab
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.auth_plugin import NoOpControlAuthnPlugin
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.servicer.control.control_handlers import start_run

    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                             ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)).state()
    _, account = NoOpControlAuthnPlugin().validate_tokens_in_metadata([])
    request = StartRunRequest(fab=ProtoFab(content=fab, verifications=verifications))
    response = start_run(request, account, state, "grpc-rere")
    assert response.run_id
    stored = state.get_fab(hashlib.sha256(fab).hexdigest())
    assert stored is not None and stored.content == fab
    return response.run_id, stored


def deliver(fab: Any, run_id: int, trusted_entities: dict[str, str] | None,
            ) -> tuple[list[Any], list[str]]:
    """A train message of run ``run_id`` reaches a SuperNode whose SuperLink serves ``fab``.

    Returns:
        The replies the SuperNode queued at once (an error when it refused the bundle)
        and the ids of the messages it confirmed as received (it will run them).

    """
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate import NodeStateFactory
    from flwr.supernode.start_client_internal import _pull_and_store_message

    factory = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
    state = NodeStateFactory(factory).state()
    state.set_node_id(7)
    store = factory.store()
    metadata = Metadata(run_id=run_id, message_id="", src_node_id=1, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=3600.0, message_type="train")
    message = Message(metadata=metadata, content=RecordDict({"config": ConfigRecord({"x": 1})}))
    message.metadata.__dict__["_message_id"] = message.object_id
    objects = {k: v.deflate() for k, v in get_all_nested_objects(message).items()}
    run = Run.create_empty(run_id)
    run.fab_id, run.fab_version, run.fab_hash = "flwrlabs/fedlora", "1.0.0", fab.hash_str
    confirmed: list[str] = []
    _pull_and_store_message(
        state, store, {}, receive=lambda: (message, get_object_tree(message)),
        get_run=lambda _run_id: run, get_fab=lambda _hash, _run_id: fab,
        pull_object=lambda _run_id, object_id: objects[object_id],
        confirm_message_received=lambda _run_id, message_id: confirmed.append(message_id),
        trusted_entities=trusted_entities)
    return list(state.get_messages_legacy(is_reply=True)), confirmed


def refused(replies: list[Any]) -> bool:
    from flwr.supernode.start_client_internal import FAB_VERIFICATION_ERROR

    return len(replies) == 1 and replies[0].has_error() and \
        replies[0].error.code == FAB_VERIFICATION_ERROR.code


def test_an_uploaded_bundle_is_stored_without_any_signature(fab_bytes: bytes) -> None:
    """``flwr run .``: the Control API drops whatever verification the request carries."""
    forged = hub_verification(fab_bytes, Ed25519PrivateKey.generate())
    for verifications in ({}, forged):
        _, stored = start_run_as_flwr_run(fab_bytes, verifications)
        assert stored.verifications == {}


def test_a_supernode_with_trusted_entities_refuses_every_uploaded_bundle(
        fab_bytes: bytes, tmp_path: Path) -> None:
    reviewer = Ed25519PrivateKey.generate()
    entities = trusted_entities_file(tmp_path, reviewer)
    run_id, stored = start_run_as_flwr_run(fab_bytes, hub_verification(fab_bytes, reviewer))
    replies, confirmed = deliver(stored, run_id, entities)
    assert refused(replies) and confirmed == []  # "not supported by the connected SuperLink"
    # without trusted entities (the default, and docker-compose.yml) it runs any bundle
    replies, confirmed = deliver(stored, run_id, None)
    assert replies == [] and len(confirmed) == 1


def test_only_a_hub_signature_by_a_trusted_key_passes(fab_bytes: bytes, tmp_path: Path,
                                                      ) -> None:
    """Trusted entities do work, for what only Flower Hub can deliver: a reviewed bundle."""
    from flwr.supercore.fab import Fab

    reviewer = Ed25519PrivateKey.generate()
    entities = trusted_entities_file(tmp_path, reviewer)
    run_id, stored = start_run_as_flwr_run(fab_bytes, {})
    signed = Fab(stored.hash_str, stored.content, hub_verification(fab_bytes, reviewer))
    replies, confirmed = deliver(signed, run_id, entities)
    assert replies == [] and len(confirmed) == 1
    other = Fab(stored.hash_str, stored.content,
                hub_verification(fab_bytes, Ed25519PrivateKey.generate()))
    replies, confirmed = deliver(other, run_id, entities)
    assert refused(replies) and confirmed == []
    # a signature made for another bundle does not carry over
    tampered = Fab(stored.hash_str, stored.content + b"\0",
                   hub_verification(fab_bytes, reviewer))
    replies, confirmed = deliver(tampered, run_id, entities)
    assert refused(replies) and confirmed == []
