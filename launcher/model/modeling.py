"""Tokenizer and model construction: a HF checkpoint (a local directory, or a Hub id loaded
through transformers and the HF cache), loaded unchanged, or a random init from a config.

A checkpoint is loaded as transformers loads it: its vocabulary, tying, attention implementation
and weights are kept, so its loss in hydralm is its loss in transformers. A checkpoint directory
is untrusted input: its own Python code (config.json `auto_map`) runs only with
`model.trust_remote_code=true`, and pickled weights (`pytorch_model*.bin`) are read only with
`model.allow_pickled_weights=true`, and then with `torch.load(weights_only=True)`.
"""

import contextlib
import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from accelerate import init_empty_weights
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from launcher.distributed import World
from launcher.errors import ConfigError, at_least, choice_error
from launcher.model.precision import cast_parameters

log = logging.getLogger("hydralm")

ATTENTION_IMPLEMENTATIONS = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")
SAFE_WEIGHTS = "*.safetensors"
PICKLED_WEIGHTS = "pytorch_model*.bin"  # what transformers reads when a directory has no safetensors
# What a model on the Hub needs here: config, tokenizer, safetensors weights (and their index).
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py")


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.path,
                                              trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(requested: str, device: torch.device, config) -> Optional[str]:
    """`auto`: flash attention where it can run and the model supports it, else transformers' own
    choice for the model (sdpa where supported; eager for e.g. Gemma 2, whose attention logits are
    soft-capped). (check_model rejects an explicit choice the model or the machine cannot run.)"""
    if requested != "auto":
        return requested
    flash_ready = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash_ready and getattr(_model_class(config), "_supports_flash_attn", False) else None


def build_model(
    model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, world: World, low_cpu_mem_usage: bool = False,
    empty: bool = False, dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Weights in `dtype` (train.precision's: fp32 master weights, or bf16) on the host;
    sharding and mixed precision decide what lands on the device.

    With `low_cpu_mem_usage`, only rank 0 reads (or initialises) the weights; the other ranks
    build the parameters on the meta device and receive the weights after sharding. `empty`:
    every rank builds meta parameters, for weights loaded after sharding (a training checkpoint).
    Buffers (rotary frequencies, embedding scales) are always computed as the model defines them.
    """
    config = hf_config(model_cfg, tokenizer)
    rows = vocab_rows(model_cfg, tokenizer, config.vocab_size)
    # A random init draws in fp32 whatever the mode (the same initial weights, rounded); a
    # checkpoint loads straight into `dtype` (no fp32 copy of a bf16 model on the host).
    options = dict(dtype=torch.float32, attn_implementation=attention_implementation(model_cfg.attention, world.device, config),
                   trust_remote_code=model_cfg.trust_remote_code)
    on_meta = empty or (low_cpu_mem_usage and not world.is_main)
    if model_cfg.path is None or on_meta:
        config.vocab_size = rows
        with init_empty_weights(include_buffers=False) if on_meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, **options)
        model.tie_weights()  # inside init_empty_weights, tying made a second (meta) parameter
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path, config=config, use_safetensors=None if model_cfg.allow_pickled_weights else True,
            weights_only=True, **{**options, "dtype": dtype})
        if rows != config.vocab_size:  # the tokenizer has tokens the checkpoint lacks: new rows at the mean
            log.warning("model.tokenizer has %d tokens, model.path's vocabulary %d: the embeddings grow to %d rows",
                        len(tokenizer), config.vocab_size, rows)
            model.resize_token_embeddings(rows)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.dtype = dtype  # what config.json records, so from_pretrained(dtype="auto") reloads it alike
    return cast_parameters(model, dtype)


def hf_config(model_cfg: DictConfig, tokenizer: Optional[PreTrainedTokenizerBase] = None):
    """The transformers config: the checkpoint's own, or `model.config` (with the tokenizer's
    special tokens) for a random init."""
    if model_cfg.path is not None:
        return AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    kwargs = OmegaConf.to_container(model_cfg.config, resolve=True)
    special = {} if tokenizer is None else {
        f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return AutoConfig.for_model(**{**special, **kwargs})


def vocab_rows(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, rows: int) -> int:
    """Embedding rows. A checkpoint keeps its own (grown only when the tokenizer has more tokens:
    padding would add rows whose random logits join the softmax). A random init is padded to a
    multiple of `model.pad_vocab_to_multiple_of`, which changes nothing there."""
    needed = max(rows, len(tokenizer))
    if model_cfg.path is not None:
        return needed
    return math.ceil(needed / model_cfg.pad_vocab_to_multiple_of) * model_cfg.pad_vocab_to_multiple_of


def router_loss(model: torch.nn.Module, output) -> Optional[torch.Tensor]:
    """A mixture-of-experts model's load-balancing loss, weighted as transformers adds it to its own
    loss (`router_aux_loss_coef`), when the model computes it (`output_router_logits`)."""
    aux = getattr(output, "aux_loss", None)
    return None if aux is None else model.config.router_aux_loss_coef * aux


# ---------------------------------------------------------------- checks before anything loads


def check_model(model_cfg: DictConfig, max_seq_len: int) -> dict:
    """What `build_model` would refuse or silently get wrong, found from the config files alone:
    a missing model or tokenizer, custom code without `model.trust_remote_code`, pickled weights
    without `model.allow_pickled_weights` (and unsafe pickles with it), a model transformers
    cannot train as a causal LM, an attention implementation the model does not have, sequences
    longer than its positions. Returns the model's config as a dict."""
    if model_cfg.attention not in ATTENTION_IMPLEMENTATIONS:
        raise choice_error("model.attention", model_cfg.attention, ATTENTION_IMPLEMENTATIONS)
    at_least(model_cfg.pad_vocab_to_multiple_of, 1, "model.pad_vocab_to_multiple_of")
    if model_cfg.path is None and model_cfg.config is None:
        raise ConfigError(f"model={model_cfg.name} needs model.path (a local directory with HF weights and tokenizer) "
                          "or model.config (a random init)")
    if model_cfg.path is not None:
        directory = model_dir(model_cfg.path, "model.path", model_cfg.hub_id, model_cfg.allow_pickled_weights)
        read_hf_config(str(directory), "model.path")
    if model_cfg.tokenizer is not None:
        model_dir(model_cfg.tokenizer, "model.tokenizer", what="a directory with a HF tokenizer")
    elif model_cfg.path is None:
        raise ConfigError("model.tokenizer=None does not exist (a directory with a HF tokenizer)")
    if model_cfg.path is not None:
        _check_remote_code(model_cfg, directory)
        _check_weight_files(model_cfg, directory)
    try:
        config = hf_config(model_cfg)
    except (ValueError, KeyError, OSError) as err:
        key = "model.path" if model_cfg.path is not None else "model.config"
        raise ConfigError(f"{key}: transformers cannot read the model config: {_first_line(err)}") from None
    if config.get_text_config() is not config:
        raise ConfigError(
            f"model.path={model_cfg.path}: model_type={config.model_type} is a multimodal model (its config nests a "
            f"text_config); hydralm trains text-only causal LMs: use the family's text-only checkpoint")
    model_class = _model_class(config)
    if model_class is None and not model_cfg.trust_remote_code:
        raise ConfigError(
            f"model_type={config.model_type} has no causal-LM class in transformers (AutoModelForCausalLM); "
            f"hydralm trains decoder-only language models")
    requested = model_cfg.attention
    if model_class is not None and requested in ("sdpa", "flash_attention_2"):
        supported = getattr(model_class, "_supports_sdpa" if requested == "sdpa" else "_supports_flash_attn", False)
        if not supported:
            raise ConfigError(f"model.attention={requested} is not supported by {model_class.__name__}; "
                              f"use model.attention=auto (transformers' choice for the model) or eager")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and max_seq_len > max_positions:
        raise ConfigError(f"train.max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={max_positions}")
    return config.to_dict()


def model_dir(path: str, key: str, hub_id: Optional[str] = None, pickled: bool = False,
              what: str = "a directory with HF weights and tokenizer") -> Path:
    """The local directory of `path`: a directory as it is, or the snapshot of a Hub id in the HF
    cache, downloaded there first (the files transformers will read: HUB_FILES, and the pickled
    weights when `pickled`) unless HF_HUB_OFFLINE=1. `hub_id`: the preset's Hub id, named when
    `path` is a folder that does not exist here."""
    directory = Path(path).expanduser()
    if directory.is_dir():
        return directory
    if not _is_hub_id(path):
        hint = f"; the preset's model on the Hub: {key}={hub_id}" if hub_id else ""
        raise ConfigError(f"{key}={path} does not exist ({what}, or a Hub id such as meta-llama/Llama-3.1-8B){hint}")
    return _hub_snapshot(path, key, pickled)


def _is_hub_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.startswith(("/", ".", "~")):
        return False
    try:
        validate_repo_id(path)
        return True
    except HFValidationError:
        return False


def _hub_snapshot(repo_id: str, key: str, pickled: bool) -> Path:
    """huggingface_hub's snapshot_download, the cache transformers reads; its failures in one line."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    patterns = [*HUB_FILES, PICKLED_WEIGHTS] if pickled else list(HUB_FILES)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise ConfigError(f"{key}={repo_id} is gated on the Hub: accept its terms at https://huggingface.co/{repo_id} "
                          "and log in (hf auth login, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}={repo_id} is neither a local directory nor a model on the Hugging Face Hub "
                          "(a private one needs hf auth login, or HF_TOKEN)") from None
    except OSError as err:  # not cached, and offline or the Hub unreachable (LocalEntryNotFoundError, ...)
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else f"the Hub cannot be reached ({_first_line(err)})"
        raise ConfigError(f"{key}={repo_id} is not a local directory, and that Hub id is not in the HF cache "
                          f"({constants.HF_HUB_CACHE}) and {why}; download it where there is network "
                          f"(hf download {repo_id}, same HF_HOME) or give a local directory") from None


def _check_remote_code(model_cfg: DictConfig, directory: Path) -> None:
    """An `auto_map` names Python files shipped with the checkpoint. Without trust_remote_code
    they never run: transformers' own class is used when it has the architecture, otherwise the
    checkpoint is refused."""
    config = json.loads((directory / "config.json").read_text())
    if "auto_map" not in config or model_cfg.trust_remote_code:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ConfigError(
            f"model.path={model_cfg.path}: config.json has auto_map (model_type={config.get('model_type')} is "
            f"implemented by Python code in that directory, which hydralm does not run by default); "
            f"set model.trust_remote_code=true if you trust that code")
    log.info("model.path=%s: config.json's auto_map is ignored; transformers' own %s class is used",
             model_cfg.path, config["model_type"])


def _check_weight_files(model_cfg: DictConfig, path: Path) -> None:
    if any(path.glob(SAFE_WEIGHTS)):
        return  # transformers reads only the safetensors files then (use_safetensors=True)
    pickled = sorted(path.glob(PICKLED_WEIGHTS))
    if not pickled:
        raise ConfigError(f"model.path={path} holds no weights transformers reads "
                          f"(model*.safetensors, or pytorch_model*.bin with model.allow_pickled_weights=true)")
    if not model_cfg.allow_pickled_weights:
        raise ConfigError(
            f"model.path={path} holds pickled weights ({pickled[0].name}), which can run code when read; "
            f"convert them to safetensors, or set model.allow_pickled_weights=true to read them with "
            f"torch.load(weights_only=True)")
    for file in pickled:  # unpickling only (tensors memory-mapped, not read): quick even for large files
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=_is_zip(file))
        except Exception as err:  # weights_only refuses anything but tensors and plain containers
            raise ConfigError(f"model.path: {file} is not a plain tensor file, refused by "
                              f"torch.load(weights_only=True): {_first_line(err)}") from None


def _is_zip(file: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(file)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _model_class(config) -> Optional[type]:
    """transformers' causal-LM class for `config`, or None (custom code, not a causal LM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


# ---------------------------------------------------------------- structure


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the classes HF marks as not splittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return layers


def runs_remote_code(model: torch.nn.Module) -> bool:
    """The model's class came from its checkpoint's own code (model.trust_remote_code=true)."""
    return base_model_class(model).__module__.startswith("transformers_modules")


def base_model_class(model: torch.nn.Module) -> type:
    """The HF class under FSDP2's dynamic `FSDP<Class>` subclass (and under a PeftModel)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not c.__name__.startswith("FSDP"))


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


def save_hf_metadata(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """config.json (naming the HF class under the FSDP wrapper), generation config, tokenizer."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [base_model_class(model).__name__]
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
