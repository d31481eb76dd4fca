"""The strategies that move the clients' base weights, end to end (tiny model, 2 rounds)."""

import pytest

from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401
from tests.e2e.test_strategies import _run

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]
FEDIT: list = []  # FedIT's records, run once for the module


def _fedit(tmp_path, tiny_bert_dir, toy_csv):
    if not FEDIT:
        FEDIT.append(_run(tmp_path, tiny_bert_dir, toy_csv, "fedit")[0])
    return FEDIT[0]


@pytest.mark.parametrize("strategy", ["fedex-lora", "flora", "federa"])
def test_strategies_that_move_the_base_weights(tmp_path, tiny_bert_dir, toy_csv, strategy):
    """The clients apply the dense base deltas they download; the run learns."""
    records, details = _run(tmp_path, tiny_bert_dir, toy_csv, strategy)
    fedit = _fedit(tmp_path, tiny_bert_dir, toy_csv)
    assert records[2]["eval_loss"] < records[0]["eval_loss"]
    assert records[2]["base_delta_bytes"] > 0
    assert records[2]["bytes_down"] > fedit[2]["bytes_down"]  # the deltas travel down
    assert records[2]["bytes_up"] == fedit[2]["bytes_up"]  # and never up
    if strategy != "federa":  # exact: the folded update is the clients' average
        assert max(details["2"]["aggregation_error"].values()) < 1e-5
