"""Typed schema of the composed config.

Registered in Hydra's ConfigStore as `hydralm_schema` and named first in conf/config.yaml's
defaults, so Hydra itself rejects misspelt keys and values of the wrong type, naming the full key.
This module imports only hydra/omegaconf: `--cfg job` must not pay for torch.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

ASSETS_DIR = Path(__file__).parent / "assets"

# What a setting affects, for launcher/store/identity.py: the preprocessed data (the cache key) and the
# training run (what `resume` must match, and what decides whether an output directory holds
# this run or another one: launcher/store/claim.py). A field without `affects` inherits its group's, so
# a new key counts everywhere its group does until someone decides otherwise. Out of the run:
# logging, output, checkpoint cadence, and speed/memory settings that leave the math alone
# (sharding, compile, activation checkpointing, attention kernel, eval batch size, workers).
# BATCH_LAYOUT marks run keys that only split the global batch differently: an explicit
# `resume=<checkpoint>` may change them (with the world size, a resharded resume); `resume=auto`
# may not, so a sweep over them never continues another point's run.
PREPROCESSING, RUN, BATCH_LAYOUT = "preprocessing", "run", "batch layout"
# LENGTH marks run keys that only say how long the run goes on: raised on a run (finished or
# not), the run continues from its latest checkpoint (docs/runs.md, "Extending a finished run").
LENGTH = "run length"


def affects(*purposes: str, default: Any = MISSING, factory: Any = None) -> Any:
    metadata = {"affects": frozenset(purposes)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name: str = affects()
    # Local directory with HF weights + tokenizer (VectorLM's `model:`), or a Hugging Face Hub id
    # (`org/name`, loaded through transformers and the HF cache). None: random init from `config`.
    path: Optional[str] = None
    # The preset's model on the Hub, named when `path` (a cluster folder) does not exist here.
    hub_id: Optional[str] = affects(default=None)
    # HF config kwargs (must include `model_type`) for a randomly initialised model.
    config: Optional[Dict[str, Any]] = None
    # Tokenizer directory; defaults to `path`.
    tokenizer: Optional[str] = None
    # auto | flash_attention_2 | flex_attention | sdpa | eager (transformers' attn_implementation).
    attention: str = affects(default="auto")
    # Embedding rows of a random init are padded to a multiple of this (tensor-core friendly
    # shapes). A checkpoint (`path`) keeps its vocabulary: padding would change its predictions.
    pad_vocab_to_multiple_of: int = 64
    # Run Python code shipped in the checkpoint directory (config.json `auto_map`).
    trust_remote_code: bool = affects(default=False)
    # Read pickled weights (pytorch_model*.bin) when there are no safetensors, with torch.load(weights_only=True).
    allow_pickled_weights: bool = affects(default=False)


@dataclass
class DataConfig:
    name: str = affects()
    # Where the text comes from (docs/config.md, data section): pydoc (embedded corpus) | disk
    # (datasets.load_from_disk) | files (json/jsonl/csv/parquet/txt) | hub (datasets.load_dataset)
    # | preprocessed (`train_ds`/`eval_ds` already written by task=preprocess or VectorLM).
    source: str = "pydoc"
    train_ds: Optional[str] = affects(RUN, default=None)
    eval_ds: Optional[str] = affects(RUN, default=None)
    # false: train on the rows in the order the data has them (every epoch; after packing and the
    # eval hold-out), dealt round-robin to the ranks; true: a seeded permutation per epoch.
    shuffle: bool = affects(RUN, default=True)
    train_bs: int = affects(RUN, BATCH_LAYOUT, default=8)
    eval_bs: int = affects(default=8)
    ignore_index: int = -100
    # disk: the dataset directory; files: a file or glob; hub: the dataset name.
    load_path: Optional[str] = None
    # The split to train on (disk with a DatasetDict, hub).
    split: str = "train"
    # Eval examples: a split name (disk, hub) or a file/glob (files). None: every `eval_every`-th
    # example of the train split is held out for eval.
    eval_split: Optional[str] = None
    eval_every: int = 10
    # files source, .txt/.md files: one example per file | paragraph (blank-line separated) | line.
    text_unit: str = "file"
    # What an example is (launcher/data/formats.py): text | chat (a column of conversations, trained on
    # the assistant turns) | prompt_completion (trained on the completion) | sharegpt | alpaca (docs/data.md).
    format: str = "text"
    # The column of text (format text; default `text`) or of conversations (chat: `messages`, sharegpt: `conversations`).
    data_field: Optional[str] = None
    # prompt_completion: the prompt and completion columns (text, or conversations).
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    # chat: a Jinja chat template, or a file holding one; null: the tokenizer's.
    chat_template: Optional[str] = None
    # Prepended to every example (format text) or prompt (prompt_completion) before tokenizing.
    pre_pend: Optional[str] = None
    # text: BOS/EOS frame every row; prompt_completion: BOS before the prompt, EOS after the
    # completion. null: true, except for chat (the chat template places special tokens).
    add_bos_eos_tokens: Optional[bool] = None
    # Conditional fine-tuning (format text): labels are ignore_index up to and including the
    # separator; examples without it are dropped. `seperator` is the VectorLM spelling (an alias).
    separator: Optional[str] = None
    seperator: Optional[str] = None
    # Cut examples to max_seq_len instead of packing them.
    truncate: bool = False
    # None (one row per example) | full (concatenate, then chunk) | partial (chunk each example).
    packing_type: Optional[str] = None
    # Tokens shared by consecutive chunks of one stream.
    overlap: int = 0
    # Packed documents do not attend to each other (per-document position_ids in training).
    document_mask: bool = affects(RUN, default=False)
    # Accepted for VectorLM compatibility; `hf` is the only format.
    dataset_format: str = "hf"
    # task=preprocess writes {train,eval} datasets here (default: <output_dir>/data).
    save_path: Optional[str] = affects(default=None)
    # Where preprocessed datasets are cached; default $HYDRALM_CACHE or ~/.cache/hydralm.
    cache_dir: Optional[str] = affects(default=None)
    num_proc: Optional[int] = affects(default=None)
    num_workers: int = affects(default=0)
    # data.source=mixture: components [{weight, preset, data keys...}] (launcher/data/sources.py).
    mixture: Optional[List[Dict[str, Any]]] = None


@dataclass
class SchedulerConfig:
    # Any transformers.SchedulerType value, or plateau_with_warmup.
    name: str = "cosine"
    # Warmup steps = ceil(warmup_ratio x total optimizer steps), for every schedule.
    warmup_ratio: float = 0.05
    # Extra keyword arguments: scheduler_specific_kwargs for transformers' schedulers,
    # ReduceLROnPlateau's arguments (factor, patience, ...) for plateau_with_warmup.
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardingConfig:
    # NO_SHARD | FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD (case-insensitive), or auto: FULL_SHARD
    # with more than one process, else NO_SHARD (launcher/model/device_defaults.py).
    strategy: str = "auto"
    # Ranks per shard group for HYBRID_SHARD; default: ranks per node (LOCAL_WORLD_SIZE).
    shard_group_size: Optional[int] = None
    cpu_offload: bool = False
    # Only rank 0 reads the weights; the others build on the meta device and receive them.
    low_cpu_mem_usage: bool = False
    # auto: nccl on CUDA (cpu:gloo,cuda:nccl with cpu_offload), gloo on CPU.
    backend: str = "auto"
    # Seconds a rank waits for a silent one (stopped, frozen, its host hung) before every rank stops
    # with one line naming it (launcher/distributed.py). Longer than any step one rank does alone.
    collective_timeout_s: float = affects(default=600.0)


@dataclass
class TrainConfig:
    epochs: int = affects(RUN, LENGTH, default=2)
    # Cap on optimizer steps (None: run all epochs).
    max_steps: Optional[int] = affects(RUN, LENGTH, default=None)
    seed: int = 11
    max_seq_len: int = affects(PREPROCESSING, RUN, default=256)
    gradient_accumulation_steps: int = affects(RUN, BATCH_LAYOUT, default=1)
    # None disables clipping.
    max_grad_norm: Optional[float] = 1.0
    # false: optimizer.weight_decay spares biases and norm weights, as transformers' Trainer and
    # TRL do (launcher/training/optim.py parameter_groups); true: every trainable parameter decays.
    decay_norms_and_biases: bool = False
    # auto (mixed on CUDA with bf16, else fp32) | fp32 | mixed (fp32 master weights, bf16 compute) |
    # bf16 (weights, grads, AdamW state in bf16) | bf16_sr (bf16 + stochastic rounding): docs/precision.md
    precision: str = "auto"
    use_activation_checkpointing: bool = affects(default=False)
    # Checkpoint every k-th decoder layer (1: all; 2: half of them, trading memory for speed).
    activation_checkpointing_every: int = affects(default=1)
    # auto (on for CUDA, off for CPU) | true | false: torch.compile each decoder layer.
    compile: Any = affects(default="auto")
    # cross_entropy: all logits at once, upcast to fp32. chunked_cross_entropy: the output head and
    # the loss over loss_chunk_size tokens at a time, recomputed in backward (launcher/model/losses.py).
    # Both compute the same loss, so neither is part of the run's identity.
    loss: str = affects(default="cross_entropy")
    loss_chunk_size: int = affects(default=1024)
    # Evaluate and log every `logging_steps` optimizer steps (VectorLM semantics).
    logging_steps: int = affects(default=25)
    # Cap on eval batches per evaluation (None: the whole eval set).
    max_eval_batches: Optional[int] = affects(default=None)
    # Dense bf16 FLOP/s of one device for the `mfu` metric; None: looked up from the device name.
    peak_flops_per_device: Optional[float] = affects(default=None)
    checkpointing_enabled: bool = affects(default=False)
    # Fraction of an epoch between checkpoints, in (0, 1].
    save_frequency: float = affects(default=0.25)
    # Optimizer steps between checkpoints; overrides save_frequency when set.
    save_steps: Optional[int] = affects(default=None)
    # Complete checkpoints kept on disk (oldest deleted first); None keeps all.
    keep_last_n: Optional[int] = affects(default=2)


@dataclass
class TaskConfig:
    name: str = MISSING
    # Dotted path of the task function; it receives the composed config.
    fn: str = MISSING
    # Whether the task loads a model and data: then every group is checked before it starts.
    uses_model: bool = True
    # Whether the task trains the model (some settings work only for inference).
    trains: bool = False
    # Dotted path of the task's own check (it receives the composed config), run before any work.
    check: Optional[str] = None


@dataclass
class PeftConfig:
    # none: train every weight. lora: freeze the model, train LoRA adapters (peft.LoraConfig).
    name: str = "none"
    # The VectorLM `lora_peft_config` keys, passed to peft.LoraConfig.
    task_type: str = "CAUSAL_LM"
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Module names (or suffixes) to adapt, or "all-linear"; None: peft's default for the architecture.
    target_modules: Optional[Any] = None
    inference_mode: bool = False


@dataclass
class DPOConfig:
    """task=dpo: preference pairs and the sigmoid DPO loss (conf/task/dpo.yaml sets it)."""

    # The implicit reward is beta * log(policy / reference): larger keeps the policy nearer the reference.
    beta: float = affects(RUN, default=0.1)
    # Conservative DPO: the probability that a pair's preference label is wrong, in [0, 0.5).
    label_smoothing: float = affects(RUN, default=0.0)
    # Columns of the preference data: the prompt, the preferred and the dispreferred response.
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # A pair longer than train.max_seq_len keeps at most this many prompt tokens (its end),
    # then its responses are cut; None: half of train.max_seq_len.
    max_prompt_len: Optional[int] = None
    # Dropout off in the model (and LoRA's lora_dropout) while training, as TRL does: the policy
    # then starts equal to its reference (rewards 0, loss ln 2). false keeps the model's dropout.
    disable_dropout: bool = affects(RUN, default=True)


@dataclass
class GenerateConfig:
    """task=generate: prompts and sampling (conf/task/generate.yaml sets it; docs/generate.md)."""

    # Exactly one: a prompt, a list of prompts, or a JSONL file with one prompt per line (in the
    # `prompt_field` column: a string, or a conversation of {role, content} messages).
    prompt: Optional[str] = None
    prompts: Optional[List[Any]] = None
    prompts_file: Optional[str] = None
    prompt_field: str = "prompt"
    # A tokenizer with a chat template gets each prompt as a user turn plus the generation prompt.
    apply_chat_template: bool = True
    max_new_tokens: int = 64
    # false: greedy decoding; true: sampling at `temperature` with nucleus `top_p`.
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # Prompts per model.generate call (left-padded).
    batch_size: int = 8


@dataclass
class ExportConfig:
    # With peft=lora: also write the adapters merged into the base as a plain HF model.
    merge_lora: bool = False


@dataclass
class ReportConfig:
    # A run directory (with metrics.jsonl) or a multirun sweep directory.
    dir: Optional[str] = None
    # Where the PNGs and report.md go; default <dir>/report.
    out_dir: Optional[str] = None


@dataclass
class ClusterConfig:
    """A SLURM site preset (conf/cluster/): what hydra/launcher=hydralm_slurm submits with."""

    name: str = MISSING
    partition: Optional[str] = None
    qos: Optional[str] = None
    account: Optional[str] = None
    nodes: int = 1
    # GPUs per node; one submitit task (rank) per GPU.
    gpus_per_node: Optional[int] = None
    tasks_per_node: int = 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    # Time limit in minutes; USR2 arrives signal_delay_s before it and the job checkpoints and requeues.
    time_min: int = 60
    signal_delay_s: int = 120
    # Requeues after hitting the time limit (preemptions do not count).
    max_requeues: int = 3
    # The preset's shell lines run before the job (module loads, NCCL settings) are
    # hydra.launcher.setup (a list Hydra cannot take from an interpolation).


@dataclass
class Config:
    model: ModelConfig = affects(RUN)
    data: DataConfig = affects(PREPROCESSING, RUN)
    # `_target_` plus keyword arguments passed straight to the optimizer (spell-sensitive).
    optimizer: Dict[str, Any] = affects(RUN)
    scheduler: SchedulerConfig = affects(RUN)
    sharding: ShardingConfig = affects()
    task: TaskConfig = affects(RUN)
    train: TrainConfig = affects(RUN, factory=TrainConfig)
    peft: PeftConfig = affects(RUN, factory=PeftConfig)
    # name -> {_target_: logger class, its keyword arguments} (conf/logger/); {} logs to
    # metrics.jsonl and the progress bar only.
    logger: Dict[str, Any] = affects(factory=dict)
    export: ExportConfig = affects(factory=ExportConfig)
    # task=dpo only (conf/task/dpo.yaml); null for every other task.
    dpo: Optional[DPOConfig] = affects(PREPROCESSING, RUN, default=None)
    # task=generate only (conf/task/generate.yaml); null for every other task.
    generate: Optional[GenerateConfig] = affects(default=None)
    report: ReportConfig = affects(factory=ReportConfig)
    # SLURM site preset; null runs locally.
    cluster: Optional[ClusterConfig] = affects(default=None)
    # Defaults to the Hydra run/sweep directory of the job.
    output_dir: Optional[str] = affects(default=None)
    # Model checkpoint for evaluate/export: an exported HF directory or a training checkpoint.
    checkpoint: Optional[str] = affects(default=None)
    # train: auto (the latest complete checkpoint in output_dir, if any), never, or a checkpoint path.
    resume: str = affects(default="auto")
    # train: delete the run output_dir holds (if any) before starting; without it a run refuses
    # to write into a directory holding another run (launcher/store/claim.py).
    overwrite: bool = affects(default=False)
    # Free-form tags that experiment presets set (shown in `--cfg job`).
    tags: List[str] = affects(factory=list)
    # What a sweep optimises and the job returns to the sweeper (a float; launcher/training/objective.py):
    # a metric of the final evaluation, `eval_loss` or `eval_<metric>` of the task (a DPO run's
    # `eval_reward_accuracy`). hydra.sweeper.direction says whether it is minimised (default).
    objective: str = affects(default="eval_loss")


def register() -> None:
    ConfigStore.instance().store(name="hydralm_schema", node=Config)
    if not OmegaConf.has_resolver("hydralm.asset"):
        OmegaConf.register_new_resolver("hydralm.asset", lambda name: str(ASSETS_DIR / name))
    if not OmegaConf.has_resolver("hydralm.first"):  # first value that is set (not null)
        OmegaConf.register_new_resolver("hydralm.first", lambda *values: next(v for v in values if v is not None))


register()
