"""Robust screening and aggregation of a round, around a strategy's own aggregation.

See :mod:`strategies.robust` for the maths and :class:`RobustRound` for the round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from strategies.adapter import LoraAdapter
from strategies.aggregation import Aggregation
from strategies.robust import (
    COORDINATE_WISE,
    NORM_CLIP,
    capped_counts,
    change_norm,
    clip_factors,
    combine,
    cosine_threshold,
    median_direction_cosines,
    norm_threshold,
    pad_to,
    scale_change,
)
from strategies.round_stats import RoundStats
from strategies.validation import ClientUpdate

if TYPE_CHECKING:
    from strategies.base import LoraStrategy


class RobustRound(Aggregation):
    """A round's robust screening and aggregation around the strategy's own aggregation.

    Holds every accepted update until the round's replies are all in, because the
    norm bound is relative to the round's median change norm, which is not known before;
    the server's memory then grows with the updates per round, as for HetLoRA and
    FlexLoRA (``update-norm-bound=0`` with ``aggregator=mean`` keeps the streaming path).

    The change of an update is what the node sent minus what it was sent, one L2 norm
    over all those tensors (:func:`strategies.robust.change_norm`): the factors (or the
    one factor) and the head for FedIT and its relatives, the sparse deltas in SLoRA's
    first stage, the node's own-rank factors for HetLoRA and FlexLoRA. For FlexLoRA, which
    aggregates products, a bound on the factors' change also bounds the product's:
    ``||B A - B0 A0|| <= ||dB|| ||A0|| + ||B0|| ||dA|| + ||dB|| ||dA||``.

    :meth:`screen` rejects updates above the bound; :meth:`result` then feeds the rest
    to the strategy's aggregation (its weights, metrics and bookkeeping, such as HetLoRA's
    ranks, unchanged): with ``norm-clip`` each change clipped and the example counts
    capped at the round's median; with ``median`` or ``trimmed-mean`` as they are, and the
    tensors clients sent are then replaced in the result by their coordinate-wise
    aggregate over the clients (unweighted; lower-rank factors zero-padded to the global
    rank, as HetLoRA pads them). Parts clients do not send stay the strategy's. The
    strategy's own round metrics then describe its mean, computed on the way (FedIT's
    aggregation error is that of the mean, not of the median).
    """

    def __init__(self, strategy: LoraStrategy, inner: Aggregation, server_round: int) -> None:
        self.strategy = strategy
        self.config = strategy.robust
        self.inner = inner
        self.server_round = server_round
        self.held: list[tuple[ClientUpdate, float]] = []
        self.screened = False

    @property
    def stats(self) -> RoundStats:
        """The round's stats (rejections are recorded there)."""
        return self.strategy.history.setdefault(self.server_round,
                                                RoundStats(round=self.server_round))

    def add(self, update: ClientUpdate) -> None:
        """Measure the update's change and keep it until the round is complete."""
        norm = change_norm(update.state, self.strategy.sent_tensors(update.node_id))
        self.held.append((update, norm))
        self.count += 1

    def screen(self) -> None:
        """Reject the updates above the norm bound, then those against the median direction.

        The direction screen runs on the updates the norm bound kept (so a huge update
        cannot move the median it is judged by).
        """
        if self.screened:
            return
        self.screened = True
        self._screen_norms()
        self._screen_directions()

    def _screen_directions(self) -> None:
        """Reject the updates whose change has a cosine below ``update-min-cosine``."""
        threshold = self.config.update_min_cosine
        if threshold <= -1 or len(self.held) < 3:  # a median of two is their mean
            return
        references = [self.strategy.sent_tensors(u.node_id) for u, _ in self.held]
        shapes: dict[str, tuple[int, ...]] = {}
        for reference in references:
            for key, value in reference.items():
                old = shapes.get(key, tuple(value.shape))
                shapes[key] = tuple(max(a, b) for a, b in zip(old, value.shape, strict=True))
        cosines = median_direction_cosines([u.state for u, _ in self.held], references,
                                           shapes)
        limit = cosine_threshold(cosines, threshold, self.config.update_cosine_ratio)
        stats = self.stats
        stats.details["update_cosines"] = {str(u.node_id): c
                                           for (u, _), c in zip(self.held, cosines, strict=True)}
        self._withdraw([
            f"update direction: cosine {cosine:.3f} with the round's median change is below "
            f"{limit:.3f} (update-min-cosine {threshold:g}, or update-cosine-ratio "
            f"{self.config.update_cosine_ratio:g} x the round's median cosine)"
            if cosine < limit else None for cosine in cosines])

    def _withdraw(self, reasons: Sequence[str | None]) -> None:
        """Withdraw each held update whose reason is not None (one reason per held update)."""
        kept = []
        for (update, norm), reason in zip(self.held, reasons, strict=True):
            if reason is None:
                kept.append((update, norm))
            else:
                self.stats.withdraw(update.node_id, reason)
        self.held = kept
        self.count = len(kept)

    def _screen_norms(self) -> None:
        """Reject the updates whose change norm exceeds ``update-norm-bound`` x the median."""
        norms = [n for _, n in self.held]
        stats = self.stats
        stats.details["update_norms"] = {str(u.node_id): n for u, n in self.held}
        if not norms:
            return
        median = float(np.median(norms))
        stats.metrics["update-norm-median"] = median
        limit = norm_threshold(norms, self.config.update_norm_bound)
        if limit is None:
            return
        self._withdraw([
            f"update norm {norm:.4g} exceeds update-norm-bound "
            f"{self.config.update_norm_bound:g} x the round's median update norm "
            f"{median:.4g} (= {limit:.4g})" if norm > limit else None for norm in norms])

    def result(self) -> LoraAdapter:
        """The strategy's aggregate of the screened updates, under the robust aggregator."""
        self.screen()
        if not self.held:
            raise ValueError("an aggregate needs at least one update")
        if self.config.aggregator == NORM_CLIP:
            self._feed_clipped()
        else:
            for update, _ in self.held:
                self.inner.add(update)
        aggregate = self.inner.result()
        if self.config.aggregator in COORDINATE_WISE:
            aggregate = self._coordinate_wise(aggregate)
        return aggregate

    def _feed_clipped(self) -> None:
        """Clip each change to ``clip-norm`` (or the median norm); cap the example counts."""
        updates = [u for u, _ in self.held]
        norms = [n for _, n in self.held]
        limit = self.config.clip_norm or float(np.median(norms))
        factors = clip_factors(norms, limit)
        counts = capped_counts([u.num_examples for u in updates])
        for update, factor, count in zip(updates, factors, counts, strict=True):
            state, adapter = update.state, update.adapter
            if factor < 1.0 and adapter is not None:
                state = scale_change(update.state, self.strategy.sent_tensors(update.node_id),
                                     factor)
                adapter = type(adapter).from_state_dict({**adapter.to_state_dict(), **state},
                                                        adapter.alpha)
            self.inner.add(dataclasses.replace(update, state=state, adapter=adapter,
                                               num_examples=count))
        stats = self.stats
        stats.metrics["robust-clip-norm"] = limit
        stats.metrics["robust-clipped-fraction"] = sum(f < 1.0 for f in factors) / len(factors)

    def _coordinate_wise(self, aggregate: LoraAdapter) -> LoraAdapter:
        """``aggregate`` with every tensor clients sent replaced by its robust combination."""
        state = aggregate.to_state_dict()
        updates = [u for u, _ in self.held]
        keys = dict.fromkeys(k for u in updates for k in u.state)
        for key in keys:
            if key not in state:
                raise ValueError(f"the aggregate has no tensor '{key}' to replace")
            shape = tuple(state[key].shape)
            combined = combine([pad_to(u.state[key], shape) for u in updates if key in u.state],
                               self.config.aggregator, self.config.trim_fraction)
            state[key] = combined.astype(state[key].dtype)
        return LoraAdapter.from_state_dict(state, aggregate.alpha)


