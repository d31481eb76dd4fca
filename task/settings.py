"""Settings of the learning task, parsed once from Flower's flat run config.

One dataclass per concern, each validating itself with messages that name the
setting and its value. Keys are the field names with ``_`` written as ``-``, the
same keys as ``[tool.flwr.app.config]`` in ``pyproject.toml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strategies.config import (
    check,
    from_run_config,
    run_config_key,
    setting,
    settings_keys,
)

PARTITIONERS = ("auto", "iid", "dirichlet", "natural")
INSTRUCTION_FORMATS = ("auto", "messages", "alpaca", "prompt-response")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
#: the run's rounds when the run config does not say (the server's and the clients' default)
DEFAULT_NUM_ROUNDS = 5


@dataclass(frozen=True)
class ModelSettings:
    """Which model to fine-tune and where it runs.

    ``model``: ``minilm`` (the embedded MiniLM-L6 encoder), ``smollm2`` (the embedded
    SmolLM2-135M-Instruct, from its GGUF, converted once into a cached folder),
    ``tiny-bert`` / ``tiny-gpt2`` / ``tiny-llama`` (tiny random models for tests), a
    local directory, a ``.gguf`` file, or a Hugging Face hub id. ``task``: a registered
    task (:mod:`task.tasks`): ``classification``, ``causal-lm`` or ``instruction``.
    ``gradient_checkpointing``: recompute activations in the backward pass (less memory,
    about a third more compute).
    """

    model: str = setting(
        "minilm",
        "minilm | smollm2 | tiny-bert | tiny-gpt2 | tiny-llama, a local model folder, a "
        ".gguf file or a hub id")
    task: str = setting("classification", "classification | causal-lm | instruction")
    precision: str = setting(
        "auto", "auto (bf16 autocast on CUDA that supports it, else fp32) | fp32 | bf16")
    device: str = setting("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    gradient_checkpointing: bool = setting(
        False,
        "recompute activations in the backward pass: less memory, about a third more "
        "compute")

    def __post_init__(self) -> None:
        from task.tasks.registry import get_task

        check(bool(self.model), "model must not be empty")
        get_task(self.task)  # raises, naming the registered tasks
        check(self.precision in PRECISIONS,
               f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        check(self.device in DEVICES, f"device must be one of {DEVICES}, got '{self.device}'")


@dataclass(frozen=True)
class DataSettings:
    """Which data, which columns, and how it is split across clients.

    ``dataset``: ``bbc-news`` (embedded), ``bbc-news-instruct`` (instructions built from
    it: :mod:`task.bbc_instruct`), a local file (csv, json, jsonl, parquet), a folder with
    one sub-folder of text files per label, or a hub dataset name. ``partitioner``:
    ``auto`` picks the task's (Dirichlet over labels for classification, else IID).
    Instruction data (task ``instruction``): ``instruction_format`` and the column names
    of each format (:mod:`task.tasks.instruction_data`); ``system_prompt`` adds a system
    turn; ``group_column`` reports generation metrics per value of that column too.
    ``local_test_fraction``: each client keeps this share of its partition for
    evaluating its own (personalised) adapter; 0 = clients evaluate on their shard of
    the server's held-out split. ``audit_canaries``: for privacy audits, this many
    random-word canaries with random labels, each put into training with probability
    1/2 (canary i goes to client i mod num-partitions); 0 = none.
    """

    dataset: str = setting(
        "bbc-news",
        "bbc-news | bbc-news-instruct | a csv/tsv/json/jsonl/parquet file | a folder of "
        "<label>/*.txt | a hub name")
    text_column: str = setting("text", "the column holding the text (classification)")
    label_column: str = setting(
        "label", "the column holding the class (classification); every cell is text: NA is a class")
    partitioner: str = setting(
        "auto",
        "auto (Dirichlet over labels for classification, else iid) | iid | dirichlet | "
        "natural")
    dirichlet_alpha: float = setting(
        0.5, "Dirichlet concentration of the label skew (smaller: more non-IID)")
    partition_by: str = setting(
        "", "natural partitioner: the column whose values are the clients (a speaker, a site)")
    test_fraction: float = setting(
        0.2, "held-out share for the server's evaluation (stratified by label)")
    local_test_fraction: float = setting(
        0.0,
        "share of each client's partition kept to score its own adapter in federated "
        "evaluation")
    max_length: int = setting(
        128,
        "tokens per example (truncated; instruction data: the prompt is cut, the response "
        "kept)")
    audit_canaries: int = setting(
        0,
        "privacy audit: this many random canaries, each put into training with "
        "probability 1/2 (0 = none)")
    seed: int = setting(0, "the run seed (set with seed)")
    instruction_format: str = setting(
        "auto", "instruction data: auto | messages | alpaca | prompt-response")
    instruction_column: str = setting("instruction", "alpaca format: the instruction column")
    input_column: str = setting("input", "alpaca format: the optional input column")
    output_column: str = setting("output", "alpaca format: the output column")
    prompt_column: str = setting("prompt", "prompt-response format: the prompt column")
    response_column: str = setting("response", "prompt-response format: the response column")
    messages_column: str = setting("messages", "messages format: the column of chat turns")
    system_prompt: str = setting("", "a system turn for instruction records without one")
    group_column: str = setting("", "a column whose values also get their own generation metrics")

    def __post_init__(self) -> None:
        check(self.instruction_format in INSTRUCTION_FORMATS,
               f"instruction-format must be one of {INSTRUCTION_FORMATS}, "
               f"got '{self.instruction_format}'")
        check(bool(self.dataset), "dataset must not be empty")
        check(self.audit_canaries >= 0,
               f"audit-canaries must not be negative, got {self.audit_canaries}")
        check(self.partitioner in PARTITIONERS,
               f"partitioner must be one of {PARTITIONERS}, got '{self.partitioner}'")
        check(self.dirichlet_alpha > 0,
               f"dirichlet-alpha must be positive, got {self.dirichlet_alpha}")
        check(0.0 < self.test_fraction < 1.0,
               f"test-fraction must be in (0, 1), got {self.test_fraction}")
        check(0.0 <= self.local_test_fraction < 1.0,
               f"local-test-fraction must be in [0, 1), got {self.local_test_fraction}")
        check(self.max_length >= 8, f"max-length must be at least 8, got {self.max_length}")
        check(self.partitioner != "natural" or bool(self.partition_by),
               "partitioner 'natural' needs partition-by (the column to split by)")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter: rank, alpha (scale = alpha / rank), dropout, target modules.

    ``target_modules``: comma-separated module names, ``all-linear``, or ``auto``: the
    attention's query and value projections named as the architecture names them
    (:func:`task.model.default_target_modules`).
    """

    lora_rank: int = setting(8, "LoRA rank (the global rank under heterogeneous ranks)")
    lora_alpha: float = setting(16.0, "LoRA alpha; the scale is alpha / rank")
    lora_dropout: float = setting(0.0, "dropout on the LoRA path")
    target_modules: str = setting(
        "auto",
        "comma-separated module names, or auto: the attention's query and value "
        "projections")

    def __post_init__(self) -> None:
        check(self.lora_rank >= 1, f"lora-rank must be at least 1, got {self.lora_rank}")
        check(self.lora_alpha > 0, f"lora-alpha must be positive, got {self.lora_alpha}")
        check(0.0 <= self.lora_dropout < 1.0,
               f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        check(bool(self.target_modules.strip()), "target-modules must not be empty")

    def target_module_list(self, model_type: str = "") -> list[str] | str:
        """Target modules as peft expects them (``all-linear`` stays a string).

        ``auto`` resolves by the model's ``config.model_type`` (``model_type``).
        """
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        if self.target_modules.strip() == "auto":
            from task.model import default_target_modules

            return default_target_modules(model_type)
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass(frozen=True)
class TrainSettings:
    """Local training on a client: AdamW, steps or epochs, batch, accumulation."""

    learning_rate: float = setting(2e-3, "client AdamW learning rate")
    local_steps: int = setting(
        20,
        "optimizer steps per client per round (set exactly one of local-steps and "
        "local-epochs above 0)")
    local_epochs: int = setting(
        0, "passes over the client's partition per round (0: use local-steps)")
    batch_size: int = setting(16, "client batch size")
    grad_accumulation: int = setting(1, "micro-batches per optimizer step")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    seed: int = setting(0, "the run seed (set with seed)")

    def __post_init__(self) -> None:
        check(self.learning_rate > 0, f"learning-rate must be positive, got {self.learning_rate}")
        check(self.local_steps >= 0 and self.local_epochs >= 0,
               "local-steps and local-epochs must not be negative")
        check((self.local_steps > 0) != (self.local_epochs > 0),
               "set exactly one of local-steps and local-epochs above 0 "
               f"(got local-steps={self.local_steps}, local-epochs={self.local_epochs})")
        check(self.batch_size >= 1, f"batch-size must be at least 1, got {self.batch_size}")
        check(self.grad_accumulation >= 1,
               f"grad-accumulation must be at least 1, got {self.grad_accumulation}")
        check(self.weight_decay >= 0,
               f"weight-decay must not be negative, got {self.weight_decay}")


@dataclass(frozen=True)
class PrivacySettings:
    """Example-level DP-SGD on each client (Opacus), off unless ``dp`` is true.

    ``dp_target_epsilon`` above 0 chooses the noise so that the whole run (num-rounds x
    local steps) reaches it; otherwise ``dp_noise_multiplier`` is used. A client whose
    next round would take its cumulative epsilon past ``dp_epsilon_budget`` (above 0)
    refuses to train. See :class:`privacy.accounting.DPSettings`.

    ``dp_reproducible``: seed the DP noise and Poisson sampling from the run seed, the
    round and the partition, so a run can be repeated bit for bit. The server knows all
    three, so it can then regenerate (and subtract) every noise tensor: the epsilon no
    longer holds against the server. Off by default (noise and sampling from OS
    entropy); a node refuses it unless its node config says ``dp-allow-reproducible``
    (see :mod:`client.policy`), and the results folder flags the run.
    """

    dp: bool = setting(False, "example-level DP-SGD on clients (Opacus)")
    dp_noise_multiplier: float = setting(
        1.0, "DP-SGD noise multiplier (when dp-target-epsilon is 0)")
    dp_target_epsilon: float = setting(
        0.0,
        "DP-SGD: the noise is calibrated to reach this epsilon over the run (0: use "
        "dp-noise-multiplier)")
    dp_delta: float = setting(1e-5, "DP-SGD delta")
    dp_max_grad_norm: float = setting(1.0, "DP-SGD per-example clipping norm")
    dp_accountant: str = setting("rdp", "Opacus accountant: rdp | prv")
    dp_epsilon_budget: float = setting(
        0.0, "a client refuses rounds past this cumulative epsilon (0 = no budget)")
    dp_reproducible: bool = setting(
        False,
        "seed DP noise and sampling from the run seed: reproducible, NOT private against "
        "the server")

    @property
    def private_against_server(self) -> bool:
        """Whether DP-SGD runs with noise the server cannot regenerate (DP on, not reproducible)."""
        return self.dp and not self.dp_reproducible

    def __post_init__(self) -> None:
        if self.dp:
            self.to_dp()  # validates with the messages of DPSettings

    def to_dp(self) -> Any:
        """The :class:`privacy.accounting.DPSettings`, or None when DP is off."""
        if not self.dp:
            return None
        from privacy.accounting import DPSettings

        target = self.dp_target_epsilon if self.dp_target_epsilon > 0 else None
        return DPSettings(
            noise_multiplier=None if target else self.dp_noise_multiplier,
            target_epsilon=target, delta=self.dp_delta, max_grad_norm=self.dp_max_grad_norm,
            accountant=self.dp_accountant,
            epsilon_budget=self.dp_epsilon_budget if self.dp_epsilon_budget > 0 else None,
        )


@dataclass(frozen=True)
class GenerationSettings:
    """How tasks that generate (``instruction``) are scored on held-out data.

    ``eval_generate``: decode greedy answers and score them (exact match, ROUGE-L);
    off = response perplexity only. ``max_new_tokens``: the longest answer.
    ``eval_samples``: how many (prompt, reference, generated) triples each evaluated
    round writes to ``<results-dir>/samples/``.
    """

    eval_generate: bool = setting(
        True, "instruction task: score greedy answers (exact match, ROUGE-L)")
    max_new_tokens: int = setting(32, "the longest generated answer")
    eval_samples: int = setting(
        8, "(prompt, reference, generated) samples written per evaluated round")

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1,
               f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        check(self.eval_samples >= 0,
               f"eval-samples must not be negative, got {self.eval_samples}")


@dataclass(frozen=True)
class TaskSettings:
    """Everything a client (and the server's evaluator) needs to build the task."""

    model: ModelSettings
    data: DataSettings
    lora: LoraSettings
    train: TrainSettings
    privacy: PrivacySettings = PrivacySettings()
    generation: GenerationSettings = GenerationSettings()

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> TaskSettings:
        """Parse the task's part of a flat run config."""
        return cls(
            model=from_run_config(ModelSettings, config),
            data=from_run_config(DataSettings, config),
            lora=from_run_config(LoraSettings, config),
            train=from_run_config(TrainSettings, config),
            privacy=from_run_config(PrivacySettings, config),
            generation=from_run_config(GenerationSettings, config),
        )

    @staticmethod
    def keys() -> set[str]:
        """Run-config keys read by the task settings."""
        return set().union(
            *(settings_keys(c) for c in
              (ModelSettings, DataSettings, LoraSettings, TrainSettings, PrivacySettings,
               GenerationSettings))
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat run-config view of these settings."""
        flat: dict[str, Any] = {}
        for part in (self.model, self.data, self.lora, self.train, self.privacy,
                     self.generation):
            flat.update({run_config_key(k): v for k, v in dataclasses.asdict(part).items()})
        return flat
