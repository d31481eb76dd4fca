"""FFA-LoRA (Sun et al., ICLR 2024): freeze a shared random A, train and average only B.

Every client starts from the same A, derived from the run seed (the server and every
client initialise the adapter from it), so A never travels: the server sends B (and the
classification head), clients train only B (and the head), and the server averages B.
Because A is shared, ``avg(B) A = avg(B A)``: the aggregate is exact, uploads halve, and
DP noise on B stays linear in the update.

The scale ``alpha / r`` multiplies B's effect like a learning-rate factor (the paper
shows tuning alpha is equivalent to tuning the learning rate); with A frozen at its
random init, FFA-LoRA wants a larger alpha (or learning rate) than FedIT.
"""

from __future__ import annotations

from typing import Any

from strategies.adapter import LoraAdapter
from strategies.fedit import FedIT, RunningAverage
from strategies.parts import EXTRAS, LORA_A, LORA_B
from strategies.registry import register_strategy


@register_strategy("ffa-lora")
class FFALoRA(FedIT):
    """FedIT with A frozen at its shared, seeded initialisation: only B (and the head)."""

    train_parts = frozenset({LORA_B, EXTRAS})
    send_parts = frozenset({LORA_B, EXTRAS})
    download_parts = frozenset({LORA_B, EXTRAS})

    def __init__(self, **kwargs: Any) -> None:
        if LORA_A in self.train_parts | self.send_parts | self.download_parts:
            raise ValueError("FFA-LoRA keeps the shared A frozen and never sends it; it cannot "
                             "train, send or receive A (use fedit to train A)")
        super().__init__(**kwargs)

    def after_aggregation(self, server_round: int, global_adapter: LoraAdapter,
                          aggregation: RunningAverage) -> None:
        """Record the bytes A would have cost on the wire."""
        a_bytes = sum(f.A.nbytes for f in global_adapter.modules.values())
        # A stays home both ways: down to every sampled node and up from every reply
        stats = self.history[server_round]
        stats.metrics["bytes-saved"] = float(a_bytes * (stats.sampled + aggregation.count))
