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

from strategies.fedit import FedIT
from strategies.parts import EXTRAS, LORA_B
from strategies.registry import register_strategy


@register_strategy("ffa-lora")
class FFALoRA(FedIT):
    """FedIT with A frozen at its shared, seeded initialisation: only B (and the head)."""

    train_parts = frozenset({LORA_B, EXTRAS})
    send_parts = frozenset({LORA_B, EXTRAS})
    download_parts = frozenset({LORA_B, EXTRAS})
