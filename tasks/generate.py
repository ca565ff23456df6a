"""The `generate` task: sample text from a trained model, to look at what it learned.

The model is `checkpoint` (a run's final-model/, final-model-merged/, a LoRA adapter directory
such as a peft=lora run's final-model/, or a training checkpoint, loaded without an export), else
`model`. Prompts come from `generate.prompt`, `generate.prompts` or a JSONL file; a tokenizer
with a chat template gets each prompt as one user turn and the assistant's generation prompt.
Batches of `generate.batch_size` prompts, left-padded, on the model's device (one GPU when there
is one); the results go to `<output_dir>/generations.jsonl` (written atomically) and are printed.
"""

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError, at_least
from launcher.job_log import announce
from launcher.store import atomic

log = logging.getLogger("hydralm")

GENERATIONS = "generations.jsonl"


def generate(cfg: DictConfig) -> dict:
    from launcher.distributed import distributed, seed_everything
    from launcher.store.outputs import resolve_output_dir

    settings = cfg.generate
    prompts = read_prompts(settings)
    with distributed(cfg.sharding.backend) as world:
        if world.size > 1:
            raise ConfigError("task=generate runs in one process (python -m launcher, not torchrun); for a model too "
                              "big for one device see docs/generate.md")
        output_dir = resolve_output_dir(cfg, world)
        model, tokenizer = load_generation_model(cfg, world)
        seed_everything(settings.seed)
        rows = []
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            for prompt, completion in zip(batch, sample(model, tokenizer, batch, settings)):
                rows.append({"prompt": prompt, "completion": completion})
                announce(f"--- {prompt_text(prompt)}\n{completion}")
        path = output_dir / GENERATIONS
        atomic.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        announce(f"hydralm: {len(rows)} generations -> {path}")
        return {"generations": str(path), "count": len(rows)}


# ---------------------------------------------------------------------- prompts


def read_prompts(settings: DictConfig) -> list:
    """The prompts: strings, or conversations (lists of {role, content}) from a JSONL file."""
    given = [key for key in ("prompt", "prompts", "prompts_file") if settings[key] is not None]
    if len(given) != 1:
        raise ConfigError("task=generate needs exactly one of generate.prompt='...', generate.prompts='[...]' or "
                          f"generate.prompts_file=<file.jsonl> (got {', '.join('generate.' + k for k in given) or 'none'})")
    if settings.prompt is not None:
        prompts = [settings.prompt]
    elif settings.prompts is not None:
        prompts = list(OmegaConf.to_container(settings.prompts))
    else:
        prompts = _prompts_file(Path(settings.prompts_file), settings.prompt_field)
    if not prompts:
        raise ConfigError(f"task=generate: no prompts in generate.{given[0]}")
    for i, prompt in enumerate(prompts):
        if not _is_prompt(prompt) or not prompt:
            raise ConfigError(f"task=generate: prompt #{i} is {prompt!r}; a prompt is a non-empty string or a list "
                              "of {role, content} messages")
    return prompts


def _prompts_file(path: Path, field: str) -> list:
    if not path.is_file():
        raise ConfigError(f"generate.prompts_file={path} does not exist (a JSONL file, one {{\"{field}\": ...}} a line)")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"generate.prompts_file={path} line {number} is not JSON: {err}") from None
        if not isinstance(row, dict) or field not in row:
            raise ConfigError(f"generate.prompts_file={path} line {number} has no \"{field}\" "
                              f"(generate.prompt_field names the column)")
        prompts.append(row[field])
    return prompts


def _is_prompt(prompt) -> bool:
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return isinstance(prompt, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt)


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def prompt_ids(tokenizer, prompt, use_chat_template: bool) -> list[int]:
    """A chat model reads the prompt as a user turn (or the given conversation) followed by the
    template's generation prompt; the template places its special tokens. Otherwise the prompt is
    text after BOS, as hydralm frames text when it trains (data.add_bos_eos_tokens)."""
    if use_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    if not isinstance(prompt, str):
        raise ConfigError("task=generate: a conversation prompt needs a tokenizer with a chat template")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids


# ---------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(model, tokenizer, prompts: list, settings: DictConfig) -> list[str]:
    """Completions of a batch of prompts, left-padded so every prompt ends where generation starts."""
    encoded = [prompt_ids(tokenizer, prompt, settings.apply_chat_template) for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    options = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                   pad_token_id=tokenizer.pad_token_id)
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # a checkpoint's generation_config may ask for sampling: greedy means greedy
        options.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


# ---------------------------------------------------------------------- the model


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_generation_model(cfg: DictConfig, world):
    """(model in eval mode on the world's device, tokenizer)."""
    from launcher.model.lora import reload_lora_model
    from launcher.model.modeling import load_tokenizer
    from launcher.model.task_model import load_task_model

    if cfg.checkpoint is not None and is_adapter_dir(Path(cfg.checkpoint)):
        model = reload_lora_model(Path(cfg.checkpoint), cfg.model.trust_remote_code).to(world.device)
        tokenizer = load_tokenizer(OmegaConf.create({"tokenizer": cfg.checkpoint, "path": cfg.checkpoint,
                                                     "trust_remote_code": cfg.model.trust_remote_code}))
    else:
        _, tokenizer, model = load_task_model(cfg, world)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------- checks before any work


def check_generate(cfg: DictConfig) -> None:
    """The generate keys, the prompts and the model's files, before any model loads."""
    from launcher.model.modeling import check_model
    from launcher.model.task_model import model_config
    from launcher.store.run_dir import is_training_checkpoint
    from launcher.training.checkpoint import check_before_loading

    settings = cfg.generate
    if settings is None:
        raise ConfigError("task=generate needs the generate keys that conf/task/generate.yaml sets (use task=generate)")
    at_least(settings.max_new_tokens, 1, "generate.max_new_tokens")
    at_least(settings.batch_size, 1, "generate.batch_size")
    if settings.do_sample:
        if not settings.temperature > 0:
            raise ConfigError(f"generate.temperature={settings.temperature} must be > 0 (for greedy decoding use "
                              "generate.do_sample=false)")
        if not 0 < settings.top_p <= 1:
            raise ConfigError(f"generate.top_p={settings.top_p} must be in (0, 1]")
    read_prompts(settings)
    if cfg.checkpoint is None:
        if cfg.model.path is None:
            raise ConfigError(f"task=generate needs checkpoint=<run>/final-model (or a training checkpoint, or a "
                              f"LoRA adapter directory) or model.path; model={cfg.model.name} is a random init")
        check_model(cfg.model, cfg.train.max_seq_len)
        return
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint={checkpoint} does not exist (a run's final-model/, a LoRA adapter directory "
                          "or <run>/checkpoints/checkpoint-N)")
    if is_adapter_dir(checkpoint):
        base = json.loads((checkpoint / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ConfigError(f"checkpoint={checkpoint} is a LoRA adapter whose base model ({base}) is not a local "
                              "directory; generate from the merged model (export.merge_lora=true) instead")
        return
    if is_training_checkpoint(checkpoint):
        check_before_loading(checkpoint, "checkpoint")
    check_model(model_config(cfg), cfg.train.max_seq_len)
