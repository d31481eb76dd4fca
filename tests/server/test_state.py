"""The server's resumable state: round trip, atomicity, torn checkpoints, pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.state import ServerState, StateStore


def state(server_round: int) -> ServerState:
    rng = np.random.default_rng(server_round)
    return ServerState(
        round=server_round,
        arrays={"m.lora_A.weight": rng.standard_normal((2, 5)).astype(np.float32),
                "m.lora_B.weight": rng.standard_normal((5, 2)).astype(np.float32)},
        strategy={"rng": [3, list(range(5)), None], "ranks": {"7": 4}},
        records=[{"round": r, "eval_accuracy": r / 10} for r in range(server_round + 1)],
        details={str(server_round): {"client_ranks": {"7": 4}}},
        settings={"strategy": "fedit", "seed": 0},
    )


def test_round_trip_is_exact(tmp_path) -> None:
    store = StateStore(tmp_path)
    saved = state(3)
    store.save(saved)
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 3
    assert loaded.arrays.keys() == saved.arrays.keys()
    for key, value in saved.arrays.items():
        assert loaded.arrays[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded.arrays[key], value)
    assert (loaded.strategy, loaded.records, loaded.details, loaded.settings) == (
        saved.strategy, saved.records, saved.details, saved.settings)
    assert not [p for p in store.folder.iterdir() if p.name.endswith(".tmp")]


def test_no_state_means_none(tmp_path) -> None:
    assert StateStore(tmp_path).load_latest() is None


def test_only_the_newest_rounds_are_kept(tmp_path) -> None:
    store = StateStore(tmp_path, keep=2)
    for r in range(1, 5):
        store.save(state(r))
    assert store.rounds() == [4, 3]
    assert sorted(p.name for p in store.folder.iterdir()) == [
        "round-0003.json", "round-0003.safetensors", "round-0004.json", "round-0004.safetensors"]


@pytest.mark.parametrize("damage", ["truncated adapter", "other adapter", "torn manifest",
                                    "missing manifest", "wrong round", "no adapter"])
def test_a_damaged_newest_round_falls_back_to_the_previous(tmp_path, damage, caplog) -> None:
    store = StateStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    adapter = store.folder / "round-0002.safetensors"
    manifest = store.folder / "round-0002.json"
    if damage == "truncated adapter":
        adapter.write_bytes(adapter.read_bytes()[:-7])
    elif damage == "other adapter":
        adapter.write_bytes((store.folder / "round-0001.safetensors").read_bytes())
    elif damage == "torn manifest":
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "missing manifest":  # a crash between the two writes
        manifest.unlink()
    elif damage == "wrong round":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "round": 5}))
    else:
        adapter.unlink()
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 1
    np.testing.assert_array_equal(loaded.arrays["m.lora_A.weight"],
                                  state(1).arrays["m.lora_A.weight"])
    if damage != "missing manifest":
        assert "round 2 is unusable" in caplog.text


def test_every_round_damaged_means_none(tmp_path) -> None:
    store = StateStore(tmp_path)
    store.save(state(1))
    (store.folder / "round-0001.safetensors").write_bytes(b"garbage")
    assert store.load_latest() is None
