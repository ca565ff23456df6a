"""A checkpoint directory is untrusted input: its Python code runs only with
model.trust_remote_code=true, its pickled weights are read only with model.allow_pickled_weights=true
and then with torch.load(weights_only=True). Each case is told apart by a file the checkpoint's
code (or pickle) would create if it ran."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_rejected_before_any_work, compose_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.cli.app import run_task

TOKENIZER = ROOT / "launcher" / "assets" / "tiny_bpe"
LLAMA = dict(model_type="llama", vocab_size=4096, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
EVALUATE = ["task=evaluate", "model=local", "train.max_seq_len=64", "data.eval_bs=4"]

CONFIG_CODE = """from transformers import LlamaConfig

class CustomConfig(LlamaConfig):
    model_type = "hydralm_custom"
"""
MODEL_CODE = """import pathlib

from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig

pathlib.Path({marker!r}).touch()  # proof that this file ran


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""
AUTO_MAP = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}


def llama_checkpoint(directory):
    from transformers import AutoConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA), dtype=torch.float32)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(directory)
    return model


def with_custom_code(directory, marker, model_type):
    """The checkpoint's config names code shipped in the directory (auto_map), as remote-code models do."""
    (directory / "configuration_custom.py").write_text(CONFIG_CODE)
    (directory / "modeling_custom.py").write_text(MODEL_CODE.format(marker=str(marker)))
    config = json.loads((directory / "config.json").read_text())
    config.update(auto_map=AUTO_MAP, model_type=model_type, architectures=["CustomForCausalLM"])
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_custom_code_is_refused_without_trust_remote_code_and_never_prompts(evaluate, tmp_path):
    checkpoint, marker = tmp_path / "custom", tmp_path / "code-ran"
    llama_checkpoint(checkpoint)
    with_custom_code(checkpoint, marker, "hydralm_custom")
    message = "config.json has auto_map"
    assert_rejected_before_any_work([*evaluate, f"model.path={checkpoint}"], message, tmp_path)
    # The command line, with no terminal to answer transformers' remote-code prompt: one line, exit 2.
    result = subprocess.run([sys.executable, "-m", "launcher", *EVALUATE, f"model.path={checkpoint}",
                             f"output_dir={tmp_path / 'cli'}"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hydralm: error: model.path={checkpoint}: {message} (model_type=hydralm_custom is implemented by Python "
        f"code in that directory, which hydralm does not run by default); set model.trust_remote_code=true if you "
        f"trust that code"]
    assert not marker.exists()


def test_trusted_custom_code_runs_and_gives_the_models_loss(evaluate, rows, tmp_path):
    checkpoint, marker = tmp_path / "custom", tmp_path / "code-ran"
    reference = llama_checkpoint(checkpoint)
    with_custom_code(checkpoint, marker, "hydralm_custom")
    result = run_task(compose_config([*evaluate, f"model.path={checkpoint}", "model.trust_remote_code=true",
                                      f"output_dir={tmp_path / 'eval'}"]))
    assert marker.exists()
    assert result["eval_loss"] == pytest.approx(loss_of(reference, rows), rel=1e-5)


def test_code_shipped_with_a_known_architecture_is_ignored(evaluate, rows, tmp_path):
    """config.json says llama and also names its own code (as many Phi-3 / Llama checkpoints do):
    transformers' class is used and the shipped code never runs."""
    checkpoint, marker = tmp_path / "shipped-code", tmp_path / "code-ran"
    reference = llama_checkpoint(checkpoint)
    with_custom_code(checkpoint, marker, "llama")
    result = run_task(compose_config([*evaluate, f"model.path={checkpoint}", f"output_dir={tmp_path / 'eval'}"]))
    assert not marker.exists()
    assert result["eval_loss"] == pytest.approx(loss_of(reference, rows), rel=1e-5)


def test_pickled_weights_need_the_opt_in_and_are_then_read_as_plain_tensors(evaluate, rows, tmp_path):
    checkpoint = tmp_path / "pickled"
    reference = llama_checkpoint(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    torch.save(reference.state_dict(), checkpoint / "pytorch_model.bin")
    assert_rejected_before_any_work([*evaluate, f"model.path={checkpoint}"],
                                    "holds pickled weights (pytorch_model.bin), which can run code when read; "
                                    "convert them to safetensors, or set model.allow_pickled_weights=true", tmp_path)
    result = run_task(compose_config([*evaluate, f"model.path={checkpoint}", "model.allow_pickled_weights=true",
                                      f"output_dir={tmp_path / 'eval'}"]))
    assert result["eval_loss"] == pytest.approx(loss_of(reference, rows), rel=1e-5)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_even_with_the_opt_in(evaluate, tmp_path):
    checkpoint, marker = tmp_path / "malicious", tmp_path / "pickle-ran"
    reference = llama_checkpoint(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with open(checkpoint / "pytorch_model.bin", "wb") as f:  # the weights, plus a payload
        pickle.dump({**reference.state_dict(), "payload": _RunsCodeWhenUnpickled(marker)}, f)
    assert_rejected_before_any_work([*evaluate, f"model.path={checkpoint}", "model.allow_pickled_weights=true"],
                                    "pytorch_model.bin is not a plain tensor file, refused by "
                                    "torch.load(weights_only=True)", tmp_path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Four 30-token rows (train and eval), as data=preprocessed reads them."""
    from datasets import Dataset

    ids = torch.randint(3, 4096, (4, 30), generator=torch.Generator().manual_seed(0)).tolist()
    root = tmp_path_factory.mktemp("rows")
    for split in ("train", "eval"):
        Dataset.from_dict({"input_ids": ids, "labels": ids}).save_to_disk(str(root / split))
    return root, torch.tensor(ids)


@pytest.fixture
def evaluate(rows):
    root = rows[0]
    return [*EVALUATE, "data=preprocessed", f"data.train_ds={root / 'train'}", f"data.eval_ds={root / 'eval'}"]


def loss_of(model, rows) -> float:
    """transformers' own loss of `model` on the eval rows."""
    ids = rows[1]
    with torch.no_grad():
        return model.eval()(input_ids=ids, labels=ids).loss.item()
