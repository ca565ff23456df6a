"""LoRA adapters (the `peft` library) on a frozen model, trained under FSDP2.

The adapters are injected before FSDP2 wraps the model, so each decoder layer stays one FSDP unit
that holds its frozen base weights and its trainable adapters side by side: FSDP2 shards every
parameter and reduce-scatters gradients only for those that require them. Only the adapters get
gradients and optimizer state, and only they are exported (and checkpointed, through
`trainable_state_dict`).
"""

from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from launcher.errors import ConfigError, choice_error

PEFT_METHODS = ("none", "lora")
TASK_TYPES = ("CAUSAL_LM",)  # hydralm trains AutoModelForCausalLM

# peft.target_modules=null: every projection of each attention block, by model_type (names are
# suffixes of module paths; GPT-2's c_attn and c_proj are Conv1D layers, which peft adapts with
# fan_in_fan_out). Model types not listed: all-linear (every linear layer but the output head).
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGET_MODULES = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text"), ATTENTION_PROJECTIONS),
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt_neox": ["query_key_value", "attention.dense"],
}
ALL_LINEAR = "all-linear"


def lora_enabled(peft_cfg: DictConfig) -> bool:
    return peft_cfg.name == "lora"


def is_lora_model(model: torch.nn.Module) -> bool:
    """A PeftModel (also under FSDP2's wrapper class)."""
    return hasattr(model, "peft_config")


def default_target_modules(model_type: str):
    return DEFAULT_TARGET_MODULES.get(model_type, ALL_LINEAR)


def lora_config(peft_cfg: DictConfig, model_type: str):
    from peft import LoraConfig

    target_modules = peft_cfg.target_modules
    if OmegaConf.is_config(target_modules):
        target_modules = OmegaConf.to_container(target_modules)
    if target_modules is None:
        target_modules = default_target_modules(model_type)
    return LoraConfig(
        task_type=peft_cfg.task_type,
        r=peft_cfg.r,
        lora_alpha=peft_cfg.lora_alpha,
        lora_dropout=peft_cfg.lora_dropout,
        target_modules=target_modules,
        inference_mode=peft_cfg.inference_mode,
    )


def apply_lora(model: torch.nn.Module, peft_cfg: DictConfig, base_name_or_path: Optional[str]) -> torch.nn.Module:
    """Freeze `model` and wrap it in a PeftModel with fresh adapters (peft=none: `model` as is).

    `base_name_or_path` is recorded in the adapter config: the HF directory the adapters apply to.
    """
    if not lora_enabled(peft_cfg):
        return model
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(peft_cfg, model.config.model_type))
    # get_peft_model records the model's own name_or_path, empty for a random init
    peft_model.active_peft_config.base_model_name_or_path = base_name_or_path
    return peft_model


def check_peft(peft_cfg: DictConfig, task: DictConfig) -> None:
    """The `peft` values (check_lora_targets tries them on the model); `task` says whether it trains."""
    if peft_cfg.name not in PEFT_METHODS:
        raise choice_error("peft.name", peft_cfg.name, PEFT_METHODS)
    if not lora_enabled(peft_cfg):
        return
    if peft_cfg.task_type not in TASK_TYPES:
        raise choice_error("peft.task_type", peft_cfg.task_type, TASK_TYPES)
    if peft_cfg.r < 1:
        raise ConfigError(f"peft.r={peft_cfg.r} must be >= 1")
    if peft_cfg.lora_alpha <= 0:
        raise ConfigError(f"peft.lora_alpha={peft_cfg.lora_alpha} must be > 0")
    if not 0 <= peft_cfg.lora_dropout < 1:
        raise ConfigError(f"peft.lora_dropout={peft_cfg.lora_dropout} must be in [0, 1)")
    if peft_cfg.inference_mode and task.trains:
        raise ConfigError(f"peft.inference_mode=true freezes the adapters: task={task.name} would train nothing")


def check_lora_targets(peft_cfg: DictConfig, model_cfg: DictConfig) -> None:
    """The adapters are injected into a weightless (meta) copy of the model, so target_modules
    that match nothing fail before any weight is loaded."""
    if not lora_enabled(peft_cfg):
        return
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from launcher.model.modeling import hf_config

    config = hf_config(model_cfg)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    try:
        get_peft_model(skeleton, lora_config(peft_cfg, config.model_type))
    except ValueError as err:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in skeleton.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"peft.target_modules={peft_cfg.target_modules} cannot be adapted: {err}; "
            f"the model's linear modules: {', '.join(linear)}"
        ) from None


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; DTensor shards count with their global size."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state_dict(model: torch.nn.Module, full: bool = True) -> dict:
    """The parameters that train (the adapters with peft=lora), by their names in `model`.

    Collective: every rank calls it. full=True: gathered from the FSDP shards onto the CPU (every
    rank gets copies of the full tensors; for export). full=False: this rank's DTensor shards, for a
    sharded checkpoint (torch.distributed.checkpoint) that leaves the frozen base alone.
    """
    options = StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    # On one CPU rank the "gathered" tensors are the parameters themselves; adapters are small.
    return {name: tensor.clone() for name, tensor in state.items()} if full else state


def base_needs_saving(model_cfg: DictConfig, model: torch.nn.Module) -> bool:
    """True when `model.path` alone cannot rebuild the frozen base the adapters apply to: a random
    init, or embeddings grown beyond the checkpoint's vocabulary for a larger tokenizer."""
    if model_cfg.path is None:
        return True
    from launcher.model.modeling import hf_config

    return hf_config(model_cfg).vocab_size != model.get_input_embeddings().num_embeddings


def reload_lora_model(adapter_dir: Path, trust_remote_code: bool = False):
    """The trained model from an adapter directory: its recorded base plus the adapters."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, adapter_dir)
