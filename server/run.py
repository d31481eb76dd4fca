"""One federated run on the server: strategy, rounds, evaluation, results."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from privacy.client_level import ClientLevelDP
from privacy.transports import transport_for
from server.errors import RunFailed
from server.plots import plot_metrics
from server.replies import stream_replies
from server.results import ResultsWriter
from server.state import ServerState, StateStore
from server.stopping import budgets_spent, no_update_accepted, reason_to_stop
from server.tracking import Tracker, make_trackers
from strategies import LoraStrategy, get_strategy_class
from strategies.codec import adapter_to_record, record_to_adapter, state_to_record
from strategies.sparse import is_dense_key
from task.run_settings import RunSettings
from task.tasks import Task, get_task
from task.training import Encoded

RoundCallback = Callable[[dict[str, Any]], None]
#: (round, training replies received so far, messages sent): a progress display's feed
ReplyCallback = Callable[[int, int, int], None]

#: settings a resumed run must share with the saved one (they change what is trained)
RESUME_MUST_MATCH = ("strategy", "model", "task", "dataset", "lora-rank", "lora-alpha",
                     "target-modules", "seed", "partitioner", "dirichlet-alpha", "dp")


def build_client_dp(settings: RunSettings) -> ClientLevelDP | None:
    """Client-level DP from the ``client-dp-*`` settings (None when ``client-dp-noise`` is 0)."""
    fed = settings.federation
    if fed.client_dp_noise == 0:
        return None
    return ClientLevelDP(noise_multiplier=fed.client_dp_noise, clip_norm=fed.client_dp_clip,
                         delta=fed.client_dp_delta, seed=fed.seed,
                         secure_seed=fed.client_dp_secure_seed)


def build_strategy(settings: RunSettings) -> LoraStrategy:
    """The strategy named in the settings, configured from them."""
    fed = settings.federation
    return get_strategy_class(fed.strategy)(
        lora_alpha=settings.task.lora.lora_alpha,
        config=settings.strategy,
        fraction_train=fed.fraction_train,
        min_train_nodes=fed.min_train_nodes,
        min_available_nodes=fed.min_available_nodes,
        max_num_examples=fed.max_num_examples,
        fraction_evaluate=fed.fraction_evaluate,
        min_evaluate_nodes=1 if fed.fraction_evaluate > 0 else 0,
        seed=fed.seed,
        min_reply_fraction=fed.min_reply_fraction,
        client_dp=build_client_dp(settings),
        **dataclasses.asdict(settings.robust),
    )


@dataclass
class RunSummary:
    """The outcome of a run."""

    results_dir: Path
    records: list[dict[str, Any]]
    seconds: float

    @property
    def final(self) -> dict[str, Any]:
        """The last round's record."""
        return self.records[-1]

    def best(self, key: str = "eval_accuracy", higher_is_better: bool = True) -> float | None:
        """The best value of ``key`` over the evaluated rounds."""
        values = [r[key] for r in self.records if r.get(key) is not None]
        if not values:
            return None
        return max(values) if higher_is_better else min(values)


class FederatedRun:
    """Runs the rounds through Flower's strategy loop and writes the results folder."""

    def __init__(self, settings: RunSettings, on_round: RoundCallback | None = None,
                 on_reply: ReplyCallback | None = None) -> None:
        from threadpoolctl import threadpool_limits

        from task.runtime import cached_runtime

        # numpy's OpenBLAS runs on one thread in the server: torch's evaluation owns the
        # cores, and the two thread pools on the same cores were seen to hang OpenBLAS
        # (a 384 x 8 @ 8 x 384 product spinning for minutes in exec_blas, in a sweep's
        # long-lived process). The server's numpy work (LoRA factors) is small.
        threadpool_limits(limits=1, user_api="blas")

        self.settings = settings
        self.strategy = build_strategy(settings)
        self.transport = transport_for(settings.federation)
        self.runner: Strategy = self.transport.wrap(self.secured(), settings.federation)
        self.runtime = cached_runtime(settings.task)
        self.writer = ResultsWriter(settings.federation.results_dir, settings.to_dict(),
                                    keep_checkpoints=settings.federation.keep_checkpoints)
        self.state_store = StateStore(settings.federation.results_dir)
        self.on_round = on_round
        self.on_reply = on_reply
        self.trackers = make_trackers(settings.federation.trackers, self.writer.root,
                                      settings.to_dict(),
                                      settings.federation.mlflow_tracking_uri)

    def secured(self) -> Strategy:
        """The strategy, wrapped in secure aggregation when ``secure-aggregation`` is on."""
        if not self.settings.secure.secure_aggregation:
            return self.strategy
        from privacy.secagg_flower import SecureAggregation

        return SecureAggregation(self.strategy, self.settings.secure,
                                 timeout=self.settings.federation.round_timeout)

    #: progress feed and experiment trackers (none unless given)
    on_reply: ReplyCallback | None = None
    trackers: Sequence[Tracker] = ()

    #: held-out examples the task could not encode (a response longer than max-length)
    eval_dropped: int = 0

    @property
    def task(self) -> Task:
        """The run's task (what the model learns and how it is scored)."""
        return get_task(self.settings.task.model.task)

    def _should_evaluate(self, server_round: int) -> bool:
        fed = self.settings.federation
        return server_round % fed.eval_every == 0 or server_round == fed.num_rounds

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate on the server, checkpoint and record metrics after a round (and before one).

        The task scores the adapter (:meth:`task.tasks.base.Task.evaluate`); a task that
        generates also gives samples, written to ``samples/round-NNN.jsonl``.
        """
        from task.training import evaluate_task

        started = time.monotonic()
        alpha = self.settings.task.lora.lora_alpha
        self.runtime.set_adapter(record_to_adapter(arrays, alpha))
        scores: dict[str, float] = {}
        if self._should_evaluate(server_round):
            result = evaluate_task(
                self.runtime.model, self.runtime.tokenizer, self._eval_data(server_round),
                batch_size=self.settings.federation.eval_batch(self.runtime.device),
                device=self.runtime.device, autocast=self.runtime.autocast,
                generation=self.settings.task.generation)
            scores = result.scores
            self.writer.write_samples(server_round, result.samples)
        if server_round > 0 and self.settings.federation.keep_checkpoints > 0:
            self.writer.save_checkpoint(self.runtime.model, server_round)
        record = self._round_record(server_round, scores, time.monotonic() - started)
        self.writer.add_round(record, self._round_details(server_round))
        self._log_round(record)
        for tracker in self.trackers:
            tracker.log_round(record)
        if self.on_round is not None:
            self.on_round(record)
        return MetricRecord(scores) if scores else None

    def _eval_data(self, server_round: int) -> Encoded:
        """The held-out split, or its fixed subset for intermediate rounds."""
        fed = self.settings.federation
        data = self.runtime.encoded_test()
        self.eval_dropped = data.dropped
        if fed.eval_subset == 0 or fed.eval_subset >= len(data) or \
                server_round == fed.num_rounds:
            return data
        order = np.random.default_rng(fed.seed).permutation(len(data))[: fed.eval_subset]
        return data.subset([int(i) for i in order])

    def _round_record(self, server_round: int, scores: dict[str, float],
                      eval_seconds: float) -> dict[str, Any]:
        stats = self.strategy.history.get(server_round)
        record: dict[str, Any] = {
            "round": server_round,
            **{f"eval_{k}": v for k, v in scores.items()},
            "eval_seconds": eval_seconds,
            "seconds": (time.monotonic() - stats.started) if stats else eval_seconds,
            "bytes_up": stats.bytes_up if stats else 0,
            "bytes_down": stats.bytes_down if stats else 0,
        }
        if stats is not None:
            record.update(train_loss=stats.train_loss, num_sampled=stats.sampled,
                          num_accepted=stats.accepted, num_rejected=stats.rejected,
                          num_failed=stats.failed)
            record.update({k.replace("-", "_"): v for k, v in stats.metrics.items()})
        return record

    def _round_details(self, server_round: int) -> dict[str, Any]:
        """Per-client and per-module figures of a round, for ``details.json``."""
        stats = self.strategy.history.get(server_round)
        if stats is None:
            return {}
        details: dict[str, Any] = {"client_ranks": {str(k): v for k, v in
                                                    sorted(stats.client_ranks.items())}}
        rejections = list(stats.rejections) + self.transport.rejections(self.runner,
                                                                         server_round)
        if rejections:
            details["rejections"] = [{"node": n, "reason": r} for n, r in rejections]
        details.update(stats.details)
        return details

    def _log_round(self, r: dict[str, Any]) -> None:
        total = self.settings.federation.num_rounds
        parts = [f"[round {r['round']}/{total}]"]
        for key in dict.fromkeys((self.task.metric, "accuracy", "exact_match")):
            if r.get(f"eval_{key}") is not None:
                parts.append(f"{key.replace('_', ' ')} {r[f'eval_{key}']:.4f}")
        if r.get("eval_loss") is not None:
            parts.append(f"eval loss {r['eval_loss']:.4f}")
        if r.get("train_loss") is not None:
            parts.append(f"train loss {r['train_loss']:.4f}")
        if r["round"] > 0:
            parts.append(f"clients {r.get('num_accepted', 0)}/{r.get('num_sampled', 0)}")
            parts.append(f"up {r['bytes_up'] / 1e6:.2f} MB down {r['bytes_down'] / 1e6:.2f} MB")
        parts.append(f"{r['seconds']:.1f} s")
        log(INFO, " | ".join(parts))

    def execute(self, grid: Grid) -> RunSummary:
        """Run every round (from the saved state with ``resume``); save the final adapter.

        The loop is Flower's ``Strategy.start`` with three changes: replies are folded into
        the aggregate as they arrive (:func:`server.replies.stream_replies`); the initial
        adapter (round 0) is evaluated after round 1's messages are sent, while the nodes
        build their models, not before; and the server's state is saved after every round
        so a restarted server can resume.
        """
        started = time.monotonic()
        fed = self.settings.federation
        initial = adapter_to_record(self.strategy.initial_global(
            self.runtime.initial_adapter, self.runtime.base_weights))
        arrays, first_round = initial, 1
        resumed = self.resume() if fed.resume else None
        if resumed is not None:
            arrays, first_round = state_to_record(resumed.arrays), resumed.round + 1
        privacy = self.settings.task.privacy
        if privacy.dp and privacy.dp_reproducible:
            log(WARNING, "dp-reproducible=true: the clients' DP-SGD noise and sampling are "
                "seeded from the run seed, so whoever knows the run config (this server) can "
                "regenerate them: the epsilon is NOT private against the server")
        self.runner.summary()
        for server_round in range(first_round, fed.num_rounds + 1):
            log(INFO, "[ROUND %d/%d]", server_round, fed.num_rounds)
            messages = list(self.runner.configure_train(server_round, arrays, ConfigRecord(),
                                                        grid))
            replies = self._counted(server_round, len(messages), stream_replies(
                grid, messages, timeout=fed.round_timeout))
            if server_round == 1:  # the initial adapter, scored while the nodes set up
                self.evaluate(0, initial)
            new_arrays, _ = self.runner.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            evaluate = list(self.runner.configure_evaluate(server_round, arrays, ConfigRecord(),
                                                           grid))
            if evaluate:
                self.runner.aggregate_evaluate(server_round, grid.send_and_receive(
                    evaluate, timeout=fed.round_timeout))
            self.evaluate(server_round, arrays)
            self.save_state(server_round, arrays)
            stopped = self.reason_to_stop(server_round)
            if stopped is not None:
                log(ERROR if not budgets_spent(self.strategy.history[server_round]) else
                    WARNING, "%s", stopped)
                break
        final = record_to_adapter(arrays, self.settings.task.lora.lora_alpha)
        self.runtime.set_adapter(final)
        self.writer.save_adapter(self.runtime.model, "final_adapter", base_deltas={
            k: v for k, v in final.extras.items() if is_dense_key(k)})
        summary = RunSummary(self.writer.root, self.writer.records, time.monotonic() - started)
        plot_metrics(summary.records, self.writer.root / "metrics.png",
                     title=f"{fed.strategy} on {self.settings.task.data.dataset}")
        rejections = {r: s.rejections for r, s in self.strategy.history.items() if s.rejections}
        no_update = no_update_accepted(self.strategy.history, first_round)
        last = self.strategy.history.get(max(self.strategy.history, default=0))
        graceful = stopped is not None and last is not None and budgets_spent(last)
        failure = no_update if graceful else (stopped or no_update)
        self.writer.write_json("summary.json", {
            "strategy": fed.strategy,
            "rounds": fed.num_rounds,
            "resumed_after_round": None if resumed is None else resumed.round,
            "final": summary.final,
            "best_eval_accuracy": summary.best(),
            "metric": self.task.metric,
            "best": summary.best(f"eval_{self.task.metric}",
                                 self.task.higher_is_better),
            "dropped_examples": {
                "unusable_records": self.runtime.data.unusable,
                "eval": self.eval_dropped,
                "train_last_round": int(summary.final.get("dropped_examples") or 0)},
            "seconds": summary.seconds,
            "rejections": {str(k): v for k, v in rejections.items()},
            "dp_private_against_server": privacy.private_against_server,
            "transport": self.transport.name,
            "secure_aggregation": self.settings.secure.secure_aggregation,
            "payload_encryption": self.transport.name == "encrypted",
            "clients_authenticated": self.transport.clients_authenticated(self.runner),
            "no_update_accepted": no_update,
            "stopped": stopped,
            "failure": failure,
        })
        log(INFO, "results written to %s", self.writer.root)
        for tracker in self.trackers:
            tracker.finish(self.writer.root)
        if failure is not None:
            if stopped is None:
                log(ERROR, "%s", failure)
            raise RunFailed(failure)
        return summary

    def reason_to_stop(self, server_round: int) -> str | None:
        """Why the run must stop after ``server_round`` (:func:`server.stopping.reason_to_stop`)."""
        return reason_to_stop(self.strategy.history, server_round,
                              self.settings.federation.max_failed_rounds)

    def _counted(self, server_round: int, sent: int,
                 replies: Iterator[Message]) -> Iterator[Message]:
        """The replies, each reported to ``on_reply`` as it arrives."""
        if self.on_reply is not None:
            self.on_reply(server_round, 0, sent)
        for received, reply in enumerate(replies, 1):
            if self.on_reply is not None:
                self.on_reply(server_round, received, sent)
            yield reply

    def save_state(self, server_round: int, arrays: ArrayRecord) -> None:
        """Save what a restarted server needs to continue after ``server_round``."""
        self.state_store.save(ServerState(
            round=server_round,
            arrays=record_to_adapter(arrays, self.strategy.lora_alpha).to_state_dict(),
            strategy=self.strategy.state_dict(), records=self.writer.records,
            details=self.writer.details, settings=self.settings.to_dict()))

    def resume(self) -> ServerState | None:
        """Load the newest intact saved round and restore the strategy and the results.

        Raises:
            ValueError: the saved run used settings that change what is trained.

        """
        state = self.state_store.load_latest()
        if state is None:
            log(WARNING, "resume: no saved state in %s; starting from round 1",
                self.state_store.folder)
            return None
        current = self.settings.to_dict()
        changed = sorted(k for k in RESUME_MUST_MATCH
                         if k in state.settings and state.settings[k] != current.get(k))
        if changed:
            raise ValueError(
                "resume: the saved run used other settings for " + ", ".join(
                    f"{k} ({state.settings[k]!r}, now {current.get(k)!r})" for k in changed)
                + "; use the saved run's settings or another results-dir")
        if state.round >= self.settings.federation.num_rounds:
            log(WARNING, "resume: the saved run already finished round %d of %d",
                state.round, self.settings.federation.num_rounds)
        self.strategy.load_state_dict(state.strategy)
        self.writer.restore(state.records, state.details)
        log(INFO, "resume: continuing after round %d from %s", state.round,
            self.state_store.folder)
        return state
