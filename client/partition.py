"""Which share of the data this node holds: from the node config.

Flower's simulation engine sets ``partition-id`` and ``num-partitions`` for each
virtual node; in a deployment, start each SuperNode with
``--node-config "partition-id=0 num-partitions=3"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition_id, num_partitions)`` from a node config.

    Raises:
        ValueError: either key is missing or out of range, with the fix.

    """
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(
            f"node config lacks {exc.args[0]!r}; start the SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from None
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} must be in [0, num-partitions={num_partitions})"
        )
    return partition_id, num_partitions
