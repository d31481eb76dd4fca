"""A node's own policy (client.policy): parsed from its node config, enforced whatever the
server's run config and instructions say."""

import math

import pytest

from client.dp import data_identity, ledger_path
from client.policy import DEFAULT_MAX_EPSILON, SIMULATION_NODE_CONFIG, NodePolicy, PolicyRefused
from privacy.accounting import DPSettings
from strategies.instructions import ClientInstructions
from task.run_settings import FederationSettings


def _instructions(rank=16, alpha=32.0, server_round=1):
    return ClientInstructions(server_round=server_round, strategy="fedit", rank=rank,
                              alpha=alpha)


def test_a_node_that_declares_nothing_still_has_a_cap_and_a_ledger_on_disk():
    policy = NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 2})
    assert policy.dp_max_epsilon == policy.dp_default_budget == DEFAULT_MAX_EPSILON == 10
    assert policy.dp_ledger == "file" and not policy.dp_allow_reproducible
    terms = policy.dp_terms(DPSettings(noise_multiplier=0.01), reproducible=False)
    assert terms.dp.epsilon_budget == 10 and "dp-max-epsilon 10" in terms.budget_source


def test_node_config_errors_name_the_key_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"dp-max-epsilon must be a number, got 'lots'.*"
                                         r"--node-config \"dp-max-epsilon="):
        NodePolicy.from_node_config({"dp-max-epsilon": "lots"})
    with pytest.raises(ValueError, match="dp-max-epsilon must be above 0"):
        NodePolicy.from_node_config({"dp-max-epsilon": 0})
    with pytest.raises(ValueError, match="dp-required must be true or false, got 'yes'"):
        NodePolicy.from_node_config({"dp-required": "yes"})
    with pytest.raises(ValueError, match="max-num-rounds must be a whole number, got 2.5"):
        NodePolicy.from_node_config({"max-num-rounds": 2.5})
    with pytest.raises(ValueError, match="dp-default-budget 20 is above dp-max-epsilon 8"):
        NodePolicy.from_node_config({"dp-max-epsilon": 8, "dp-default-budget": 20})
    with pytest.raises(ValueError, match="dp-ledger must be one of"):
        NodePolicy.from_node_config({"dp-ledger": "disk"})
    with pytest.raises(ValueError, match="dp-ledger='run' keeps no file"):
        NodePolicy.from_node_config({"dp-ledger": "run", "dp-ledger-file": "/x.json"})
    # a misspelt DP key would leave the node unprotected while its operator thinks otherwise
    with pytest.raises(ValueError, match=r"unknown DP node-config key\(s\) \['dp-max-epsilion'\]"):
        NodePolicy.from_node_config({"dp-max-epsilion": 1})


def test_node_config_values_as_flower_parses_them():
    # flower-supernode --node-config parses TOML: true, 8, inf arrive typed; tests use strings
    policy = NodePolicy.from_node_config({"dp-required": True, "dp-max-epsilon": math.inf,
                                          "dp-default-budget": 8, "max-lora-rank": 4,
                                          "dp-secure-mode": "true", "dp-max-delta": "1e-6"})
    assert policy.dp_required and policy.dp_secure_mode
    assert policy.dp_max_epsilon == math.inf and policy.dp_default_budget == 8
    assert policy.max_lora_rank == 4 and policy.dp_max_delta == 1e-6


def test_rank_is_lowered_but_an_alpha_above_the_bound_is_refused():
    policy = NodePolicy.from_node_config({"max-lora-rank": 4, "max-lora-alpha": 8})
    lowered = policy.bound_instructions(_instructions(rank=16, alpha=32.0))
    assert (lowered.rank, lowered.alpha) == (4, 8.0)  # the scale 2 is kept, alpha within 8
    with pytest.raises(PolicyRefused, match=r"lora-alpha 16 \(lora-alpha 64 at rank 16, lowered "
                                            r"with max-lora-rank 4\), above this node's "
                                            "max-lora-alpha 8"):
        policy.bound_instructions(_instructions(rank=16, alpha=64.0))
    strict = NodePolicy.from_node_config({"max-lora-alpha": 16})
    assert strict.bound_instructions(_instructions(rank=8, alpha=16.0)).alpha == 16.0
    with pytest.raises(PolicyRefused, match="raise max-lora-alpha"):
        strict.bound_instructions(_instructions(rank=8, alpha=16.5))


def test_rounds_beyond_the_node_bound_or_the_run_are_refused():
    policy = NodePolicy.from_node_config({"max-num-rounds": 10})
    policy.check_rounds(num_rounds=10, server_round=10)
    with pytest.raises(PolicyRefused, match="num-rounds 50, above this node's max-num-rounds 10"):
        policy.check_rounds(num_rounds=50, server_round=1)
    with pytest.raises(PolicyRefused, match="round 6 is past the run's num-rounds 5"):
        NodePolicy().check_rounds(num_rounds=5, server_round=6)


def test_the_client_plans_with_the_servers_default_num_rounds():
    from client.app import run_settings

    class Ctx:
        run_config: dict = {}

    assert run_settings(Ctx()).federation.num_rounds == FederationSettings().num_rounds == 5
    Ctx.run_config = {"num-rounds": 3}
    assert run_settings(Ctx()).federation.num_rounds == 3


def test_dp_terms_refuse_what_the_node_does_not_accept():
    with pytest.raises(PolicyRefused, match="dp-required=true.*run with dp=true"):
        NodePolicy(dp_required=True).dp_terms(None, reproducible=False)
    assert NodePolicy().dp_terms(None, reproducible=False) is None
    noisy = DPSettings(noise_multiplier=1.0)
    with pytest.raises(PolicyRefused, match="dp-allow-reproducible=true"):
        NodePolicy().dp_terms(noisy, reproducible=True)
    assert NodePolicy(dp_allow_reproducible=True).dp_terms(noisy, reproducible=True).reproducible
    with pytest.raises(PolicyRefused, match="dp-delta 0.001, above this node's dp-max-delta 1e-05"):
        NodePolicy(dp_max_delta=1e-5).dp_terms(DPSettings(noise_multiplier=1.0, delta=1e-3),
                                              reproducible=False)
    with pytest.raises(PolicyRefused, match="noise multiplier 0.5 .the run's dp-noise-multiplier"
                                            r"\) is below this node's dp-min-noise-multiplier 0.8"):
        NodePolicy(dp_min_noise_multiplier=0.8).dp_terms(DPSettings(noise_multiplier=0.5),
                                                         reproducible=False)
    for key, dp in (("dp-target-epsilon", DPSettings(target_epsilon=50.0)),
                    ("dp-epsilon-budget", DPSettings(noise_multiplier=1.0, epsilon_budget=50.0))):
        with pytest.raises(PolicyRefused, match=f"{key} 50, above this node's dp-max-epsilon 10"):
            NodePolicy().dp_terms(dp, reproducible=False)


def test_the_budget_is_the_tightest_of_the_servers_the_default_and_the_cap():
    noisy = DPSettings(noise_multiplier=1.0)
    assert NodePolicy().dp_terms(noisy, reproducible=False).dp.epsilon_budget == 10
    terms = NodePolicy(dp_default_budget=4).dp_terms(noisy, reproducible=False)
    assert terms.dp.epsilon_budget == 4 and "dp-default-budget 4" in terms.budget_source
    server = DPSettings(noise_multiplier=1.0, epsilon_budget=3.0)
    terms = NodePolicy(dp_default_budget=4).dp_terms(server, reproducible=False)
    assert terms.dp.epsilon_budget == 3 and "the run's dp-epsilon-budget 3" in terms.budget_source
    uncapped = NodePolicy(dp_max_epsilon=math.inf, dp_default_budget=math.inf)
    assert uncapped.dp_terms(noisy, reproducible=False).dp.epsilon_budget is None
    assert NodePolicy(dp_secure_mode=True).dp_terms(noisy, reproducible=False).dp.secure_mode


def test_the_ledger_lives_under_the_state_dir_keyed_by_the_data(tmp_path, node_state_dir,
                                                                monkeypatch):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n")
    policy = NodePolicy()
    path = ledger_path(policy, dataset=str(data), partition_id=1, num_partitions=3)
    assert path.parent == node_state_dir / "dp-ledgers"
    # the same file named otherwise is the same data: one ledger
    monkeypatch.chdir(tmp_path)
    assert ledger_path(policy, dataset="./d.csv", partition_id=1, num_partitions=3) == path
    (tmp_path / "link.csv").symlink_to(data)
    assert ledger_path(policy, dataset="link.csv", partition_id=1, num_partitions=3) == path
    assert ledger_path(policy, dataset=str(data), partition_id=2, num_partitions=3) != path
    assert data_identity(dataset="bbc-news", partition_id=0, num_partitions=2)["dataset"] \
        == "bbc-news"
    named = NodePolicy(dp_ledger_file="~/ledger.json")
    assert ledger_path(named, dataset="x", partition_id=0, num_partitions=1).is_absolute()
    simulated = NodePolicy.from_node_config(SIMULATION_NODE_CONFIG)
    assert ledger_path(simulated, dataset=str(data), partition_id=1, num_partitions=3) is None


def test_a_ledger_of_another_accountant_keeps_its_history(tmp_path):
    # a server switching dp-accountant between runs must not reset the node's ledger
    from flwr.app import Context, RecordDict

    from client.dp import load_ledger, store_ledger
    from privacy.accounting import PrivacyLedger

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    spent = PrivacyLedger("rdp")
    spent.record(noise_multiplier=1.0, sample_rate=0.1, steps=30)
    path = tmp_path / "ledger.json"
    store_ledger(context, spent, path=path, identity={"dataset": "x"})
    fresh = Context(run_id=2, node_id=1, node_config={}, state=RecordDict(), run_config={})
    loaded = load_ledger(fresh, "prv", path=path)
    assert loaded.accountant == "prv" and loaded.history == spent.history
    assert load_ledger(fresh, "rdp", path=path).epsilon(1e-5) == spent.epsilon(1e-5)
