"""What the server tells a client each round, and how it travels in a ``ConfigRecord``.

This is the contract between strategies and the ClientApp: the rank and alpha of the
client's adapter, which parts it trains, which it sends back, which stay on the client
across rounds (private), and strategy-specific options. Every key has one meaning: the
adapter's rank travels as ``adapter-rank`` (the run config's ``lora-rank`` is the
global rank, which the message never carries), options as ``opt.<setting>``, and every
entry is required (no default on the client can disagree with the server's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from strategies.parts import ADAPTER_PARTS, format_parts, parse_parts

ConfigValue = int | float | str | bool
OPTION_PREFIX = "opt."


@dataclass(frozen=True)
class ClientInstructions:
    """One client's instructions for one round.

    Attributes:
        server_round: the round, from 1.
        strategy: the strategy's registered name.
        rank: LoRA rank of the client's adapter this round.
        alpha: LoRA alpha of the client's adapter (scale = alpha / rank).
        train_parts: adapter parts the client trains; the rest stay frozen.
        send_parts: parts the client sends back.
        private_parts: parts kept on the client across rounds, never sent.
        options: strategy-specific settings (regulariser strengths and the like).

    """

    server_round: int
    strategy: str
    rank: int
    alpha: float
    train_parts: frozenset[str] = ADAPTER_PARTS
    send_parts: frozenset[str] = ADAPTER_PARTS
    private_parts: frozenset[str] = frozenset()
    options: dict[str, ConfigValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if not self.train_parts:
            raise ValueError("a client must train at least one adapter part")
        overlap = self.private_parts & self.send_parts
        if overlap:
            raise ValueError(
                f"adapter part(s) {sorted(overlap)} are private and must never be sent; "
                "a strategy cannot both keep a part private and aggregate it"
            )
        if not self.send_parts:
            raise ValueError("a client must send at least one adapter part")

    def to_config(self) -> dict[str, ConfigValue]:
        """Flat config entries (merge them into the round's ``ConfigRecord``)."""
        config: dict[str, ConfigValue] = {
            "server-round": self.server_round,
            "strategy": self.strategy,
            "adapter-rank": self.rank,
            "adapter-alpha": float(self.alpha),
            "train-parts": format_parts(self.train_parts),
            "send-parts": format_parts(self.send_parts),
            "private-parts": format_parts(self.private_parts),
        }
        config.update({OPTION_PREFIX + k: v for k, v in self.options.items()})
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, ConfigValue]) -> ClientInstructions:
        """Parse instructions from a received ``ConfigRecord``.

        Raises:
            ValueError: a missing entry or an invalid value, with its name.

        """
        try:
            return cls(
                server_round=int(config["server-round"]),
                strategy=str(config["strategy"]),
                rank=int(config["adapter-rank"]),
                alpha=float(config["adapter-alpha"]),
                train_parts=parse_parts(str(config["train-parts"])),
                send_parts=parse_parts(str(config["send-parts"])),
                private_parts=parse_parts(str(config["private-parts"])),
                options={k[len(OPTION_PREFIX):]: v for k, v in config.items()
                         if k.startswith(OPTION_PREFIX)},
            )
        except KeyError as exc:
            raise ValueError(f"instructions lack {exc.args[0]!r}") from None
