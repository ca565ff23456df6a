"""A Hub id in model.path is loaded through transformers and the HF cache; offline mode is
honoured (a pre-populated cache, built here in huggingface_hub's layout, and no network)."""

import json

import pytest
from conftest import QUICK, assert_same_weights, compose_config, final_weights, run_launcher

from launcher.errors import ConfigError
from launcher.schema import ASSETS_DIR

REPO_ID = "hydralm-test/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _save_into_hf_cache(cache, repo_id=REPO_ID):
    """A tiny Llama and the tiny tokenizer saved as huggingface_hub caches a download:
    models--org--name/snapshots/<revision>/ and refs/main naming the revision."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_bpe")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """The cache above, in this process: huggingface_hub reads its cache and offline settings
    from `constants`, which it fills from HF_HUB_CACHE/HF_HUB_OFFLINE when imported."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    snapshot = _save_into_hf_cache(cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, snapshot


def test_a_hub_id_in_the_cache_passes_the_checks_offline(offline_cache):
    from launcher.model.modeling import check_model, model_dir

    cache, snapshot = offline_cache
    cfg = compose_config(["model=local", f"model.path={REPO_ID}", "train.max_seq_len=64"])
    assert model_dir(REPO_ID, "model.path") == snapshot
    config = check_model(cfg.model, cfg.train.max_seq_len)
    saved = json.loads((snapshot / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("llama", 64, 2) == (
        saved["model_type"], saved["hidden_size"], saved["num_hidden_layers"])


def test_a_hub_id_missing_offline_is_one_line_naming_the_id_and_the_cache(offline_cache):
    from launcher.model.modeling import check_model

    cache, _ = offline_cache
    cfg = compose_config(["model=llama3_1_8b", "model.path=meta-llama/Llama-3.1-8B"])
    with pytest.raises(ConfigError) as err:
        check_model(cfg.model, cfg.train.max_seq_len)
    assert str(err.value) == (
        f"model.path=meta-llama/Llama-3.1-8B is not a local directory, and that Hub id is not in the HF cache ({cache}) "
        "and HF_HUB_OFFLINE=1 forbids downloading it; download it where there is network "
        "(hf download meta-llama/Llama-3.1-8B, same HF_HOME) or give a local directory")
    assert "\n" not in str(err.value)


def test_a_presets_missing_cluster_folder_names_its_hub_id():
    from launcher.model.modeling import check_model

    cfg = compose_config(["model=llama3_1_8b"])
    with pytest.raises(ConfigError) as err:
        check_model(cfg.model, cfg.train.max_seq_len)
    assert str(err.value).endswith("the preset's model on the Hub: model.path=meta-llama/Llama-3.1-8B")


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_every_checkpoint_preset_has_a_hub_id():
    from conftest import CONF_DIR

    for preset in sorted((CONF_DIR / "model").glob("*.yaml")):
        model = compose_config([f"model={preset.stem}"]).model
        if model.path is not None:
            assert model.hub_id and "/" in model.hub_id, preset.name
            interpolated = compose_config([f"model={preset.stem}", "model.path=${model.hub_id}"]).model
            assert interpolated.path == model.hub_id


@pytest.mark.slow
def test_training_from_a_hub_id_offline_equals_training_from_its_folder(tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE for the whole process, as a user sets them."""
    cache = tmp_path / "hf-cache"
    snapshot = _save_into_hf_cache(cache)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "TRANSFORMERS_OFFLINE": "1"}
    common = ["model=local", "train.max_seq_len=64", *QUICK]
    for name, path in (("hub", REPO_ID), ("folder", snapshot)):
        result = run_launcher([*common, f"model.path={path}", f"output_dir={tmp_path / name}"], tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_weights(final_weights(tmp_path / "hub"), final_weights(tmp_path / "folder"))

    missing = run_launcher([*common, "model.path=nobody/no-such-model", f"output_dir={tmp_path / 'missing'}"],
                           tmp_path, env=env)
    assert missing.returncode == 2
    assert f"hydralm: error: model.path=nobody/no-such-model is not a local directory, and that Hub id is not in the HF cache ({cache})" in missing.stderr
    assert not (tmp_path / "missing").exists()
