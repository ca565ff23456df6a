"""Tokenizer and model construction: a local HF checkpoint, or a random init from a config."""

import importlib.util
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from launcher.distributed import World
from launcher.errors import ConfigError, at_least, choice_error

ATTENTION_IMPLEMENTATIONS = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(requested: str, device: torch.device) -> str:
    """`auto`: flash attention where it can run, else sdpa. (validate.py rejects an explicit
    flash_attention_2 that cannot run here.)"""
    if requested != "auto":
        return requested
    flash_ready = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash_ready else "sdpa"


def build_model(
    model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, world: World, low_cpu_mem_usage: bool = False
) -> PreTrainedModel:
    """fp32 master weights on the host; sharding/mixed precision decide what lands on the device.

    With `low_cpu_mem_usage`, only rank 0 reads (or initialises) the weights; the other ranks
    build the same shapes on the meta device and receive the weights after sharding.
    """
    attn = attention_implementation(model_cfg.attention, world.device)
    config = _hf_config(model_cfg, tokenizer)
    if low_cpu_mem_usage and not world.is_main:
        config.vocab_size = _padded_vocab_size(config.vocab_size, tokenizer, model_cfg.pad_vocab_to_multiple_of)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    elif model_cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path, config=config, dtype=torch.float32, attn_implementation=attn
        )
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    rows = model.get_input_embeddings().num_embeddings
    wanted = _padded_vocab_size(rows, tokenizer, model_cfg.pad_vocab_to_multiple_of)
    if wanted != rows:
        model.resize_token_embeddings(wanted, mean_resizing=False)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _hf_config(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase):
    if model_cfg.path is not None:
        return AutoConfig.from_pretrained(model_cfg.path)
    kwargs = OmegaConf.to_container(model_cfg.config, resolve=True)
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return AutoConfig.for_model(**{**special, **kwargs})


def _padded_vocab_size(rows: int, tokenizer: PreTrainedTokenizerBase, multiple: int) -> int:
    return math.ceil(max(rows, len(tokenizer)) / multiple) * multiple


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the classes HF marks as not splittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return layers


def base_model_class(model: torch.nn.Module) -> type:
    """The HF class under FSDP2's dynamic `FSDP<Class>` subclass (and under a PeftModel)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not c.__name__.startswith("FSDP"))


def check_model(model: DictConfig, max_seq_len: int) -> dict:
    """The model exists where it is said to be and fits `train.max_seq_len`; its HF config."""
    if model.attention not in ATTENTION_IMPLEMENTATIONS:
        raise choice_error("model.attention", model.attention, ATTENTION_IMPLEMENTATIONS)
    at_least(model.pad_vocab_to_multiple_of, 1, "model.pad_vocab_to_multiple_of")
    if model.path is None and model.config is None:
        raise ConfigError("model.path (a local HF checkpoint) or model.config (random init) must be set")
    if model.path is not None:
        hf_config = read_hf_config(model.path, "model.path")
    else:
        hf_config = dict(model.config)
    tokenizer = model.tokenizer or model.path
    if tokenizer is None or not Path(tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer={tokenizer} does not exist (a directory with a HF tokenizer)")
    max_positions = hf_config.get("max_position_embeddings")
    if max_positions is not None and max_seq_len > max_positions:
        raise ConfigError(
            f"train.max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={max_positions}"
        )
    return hf_config


def check_attention_device(model: DictConfig, trains: bool = True) -> None:
    """On the machine that runs the job: what `model.attention` needs is there (to train, when
    the task `trains`)."""
    if model.attention == "flex_attention" and trains and not torch.cuda.is_available():
        raise ConfigError(
            f"model.attention=flex_attention cannot train on CPU: torch {torch.__version__} has no FlexAttention "
            "backward there (forward only: task=evaluate works); train on CPU with model.attention=sdpa"
        )
    if model.attention == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        raise ConfigError(
            "model.attention=flash_attention_2 needs a CUDA device and the flash_attn package "
            "(pip install 'hydralm[flash]'); use model.attention=sdpa or auto"
        )


def read_hf_config(path: str, key: str) -> dict:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}={path} does not exist (a directory with HF weights and tokenizer)")
    config_file = Path(path) / "config.json"
    if (Path(path) / "adapter_config.json").is_file() and not config_file.is_file():
        raise ConfigError(
            f"{key}={path} is a LoRA adapter directory, not a model; use the merged model that "
            "export.merge_lora=true writes next to it (final-model-merged)"
        )
    if not config_file.is_file():
        raise ConfigError(f"{key}={path} has no config.json: not a HuggingFace model directory")
    return json.loads(config_file.read_text())
