"""FedSA-LoRA (Guo et al., 2024): share A, keep B on the client.

A learns what is general and is averaged by the server; B stays on each client across
rounds and is never sent, so it personalises the adapter to the client's data. The
server's global view therefore has the averaged A and the head, with B at its (zero)
initialisation; each client's personalised accuracy uses its own B.
"""

from __future__ import annotations

from strategies.fedit import FedIT
from strategies.parts import EXTRAS, LORA_A, LORA_B
from strategies.registry import register_strategy


@register_strategy("fedsa-lora")
class FedSALoRA(FedIT):
    """FedIT over A (and the head) only; B is private to each client."""

    send_parts = frozenset({LORA_A, EXTRAS})
    download_parts = frozenset({LORA_A, EXTRAS})
    private_parts = frozenset({LORA_B})
