"""Tokenizer and model construction: a local HF checkpoint, or a random init from a config."""

import importlib.util
import math

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from launcher.distributed import World


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
