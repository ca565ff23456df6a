"""Tokenizer and model construction: a local HF checkpoint, or a random init from a config."""

import importlib.util
import math

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from launcher.errors import ConfigError


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(requested: str, device: torch.device) -> str:
    flash_ready = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash_ready else "sdpa"
    if requested == "flash_attention_2" and not flash_ready:
        raise ConfigError(
            "model.attention=flash_attention_2 needs a CUDA device and the flash_attn package "
            "(pip install 'hydralm[flash]'); use model.attention=sdpa or auto"
        )
    return requested


def build_model(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> PreTrainedModel:
    """fp32 master weights on the host; sharding/mixed precision decide what lands on the device."""
    attn = attention_implementation(model_cfg.attention, device)
    if model_cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=torch.float32, attn_implementation=attn)
    else:
        kwargs = OmegaConf.to_container(model_cfg.config, resolve=True)
        special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        config = AutoConfig.for_model(**{**special, **kwargs})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    _fit_embeddings(model, tokenizer, model_cfg.pad_vocab_to_multiple_of)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, multiple: int) -> None:
    rows = model.get_input_embeddings().num_embeddings
    wanted = math.ceil(max(rows, len(tokenizer)) / multiple) * multiple
    if wanted != rows:
        model.resize_token_embeddings(wanted, mean_resizing=False)


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
