"""Every option of every config group composes, and the schema catches what it should."""

import pytest
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf

# conf/hydra/ holds options of Hydra's own groups (hydra/launcher), not hydralm groups.
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name[0] != "_" and p.name != "hydra")


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_groups_are_the_documented_ones():
    assert {"model", "data", "optimizer", "scheduler", "sharding", "task", "experiment", "peft", "logger"} <= set(GROUPS)
    for group in GROUPS:
        assert len(_options(group)) >= 1, group


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS if g != "experiment" for o in _options(g)],
)
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group != "hparams_search":  # a search preset sets Hydra's sweeper, not a key of its own
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)


def test_vectorlm_experiment_reproduces_the_sample():
    cfg = compose_config(["+experiment=vectorlm_llama2_7b"])
    assert cfg.model.path == "/model-weights/Llama-2-7b-chat-hf"
    assert cfg.sharding.strategy == "FULL_SHARD"
    assert cfg.train.max_seq_len == 4096 and cfg.train.gradient_accumulation_steps == 4
    assert cfg.train.precision == "mixed" and cfg.train.use_activation_checkpointing
    assert cfg.model.attention == "flash_attention_2"
    assert OmegaConf.to_container(cfg.optimizer) == {
        "_target_": "torch.optim.AdamW", "lr": 2e-5, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-5,
    }
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.warmup_ratio == 0.05
    assert cfg.data.train_bs == 8 and cfg.data.eval_bs == 8 and cfg.data.ignore_index == -100
    assert cfg.logger.wandb.project == "MedGPT" and cfg.logger.wandb.name == "Llama-2-7B-chat"
    assert cfg.sharding.low_cpu_mem_usage


def test_overrides_land_where_documented():
    cfg = compose_config(["train.epochs=3", "optimizer.lr=3e-4", "train.max_seq_len=128", "optimizer=sgd"])
    assert cfg.train.epochs == 3 and cfg.train.max_seq_len == 128
    assert cfg.optimizer._target_ == "torch.optim.SGD"


def test_schema_rejects_misspelt_keys_and_wrong_types():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="epochz"):
        compose_config(["train.epochz=2"])
    with pytest.raises(ConfigCompositionException, match="train.epochs"):
        compose_config(["train.epochs=abc"])


def test_the_70b_experiment_shards_the_training_state_over_every_gpu():
    cfg = compose_config(["+experiment=llama3_1_70b"])
    assert cfg.model.path == "/model-weights/Meta-Llama-3.1-70B"
    assert cfg.sharding.strategy == "FULL_SHARD" and cfg.sharding.low_cpu_mem_usage
    assert cfg.train.precision == "mixed" and cfg.train.use_activation_checkpointing
    assert compose_config(["+experiment=llama3_1_70b", "model=llama3_1_70b_instruct"]).model.path.endswith("-Instruct")


def test_a_local_checkpoint_preset_needs_its_path(tmp_path):
    from conftest import assert_rejected_before_any_work

    assert_rejected_before_any_work(["model=local"], "model=local needs model.path (a local directory with HF weights and tokenizer)", tmp_path)


def test_the_trains_flag_is_set_by_exactly_the_tasks_that_train():
    """One answer to "does this task train?": conf/task/*.yaml's `trains`, which the checks for
    training-only settings (flex attention on CPU, frozen LoRA adapters) read."""
    tasks = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
    trains = {task: compose_config([f"task={task}"]).task.trains for task in tasks}
    # validate checks the config as the training run it describes
    assert trains == {"dpo": True, "evaluate": False, "export": False, "generate": False, "preprocess": False,
                      "report": False, "train": True, "validate": True}


def _restated(values: dict, defaults, prefix=""):
    """Keys of `values` whose value is the schema's default (recursively)."""
    from omegaconf import MISSING

    found = []
    for key, value in values.items():
        if key not in defaults or OmegaConf.is_missing(defaults, key):
            continue
        default = defaults[key]
        if isinstance(value, dict) and OmegaConf.is_dict(default):
            found += _restated(value, default, f"{prefix}{key}.")
        elif value != MISSING and OmegaConf.to_container(OmegaConf.create({"v": default}))["v"] == value:
            found.append(prefix + key)
    return found


@pytest.mark.parametrize("path", sorted([*(CONF_DIR / "data").glob("*.yaml"), *(CONF_DIR / "scheduler").glob("*.yaml"),
                                         CONF_DIR / "config.yaml"]), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_config_file_restates_a_schema_default(path):
    """One home per default: launcher/schema.py. A preset holds only what makes it that preset
    (`name` and `source` name it even where they are the default ones)."""
    from launcher.schema import Config, DataConfig, SchedulerConfig

    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values.pop("source", None), values.pop("name", None)
    schema = {"data": DataConfig, "scheduler": SchedulerConfig}.get(path.parent.name, Config)
    assert _restated(values, OmegaConf.structured(schema)) == []


def test_the_config_is_normalised_once_and_the_checks_only_read_it(tmp_path):
    from launcher.cli.validate import check_config, normalise_config

    cfg = compose_config(["sharding.strategy=full_shard", "scheduler.name=plataeu-with-warmup",
                          "data.seperator=Answer:", f"output_dir={tmp_path / 'out'}"])
    normalise_config(cfg)
    # VectorLM's spellings become the canonical names; format-dependent defaults are filled in
    assert (cfg.sharding.strategy, cfg.scheduler.name, cfg.data.separator) == ("FULL_SHARD", "plateau_with_warmup",
                                                                                "Answer:")
    assert (cfg.data.data_field, cfg.data.add_bos_eos_tokens) == ("text", True)
    normalised = OmegaConf.to_container(cfg)
    check_config(cfg)  # normalises again (idempotent), then checks under a read-only flag
    assert OmegaConf.to_container(cfg) == normalised
