"""Any HF causal LM from a local directory: a matrix of architecture families.

Each family is a tiny random config written to disk with `save_pretrained` (+ the committed tiny
tokenizer) and used through `model.path`, like a researcher's checkpoint. Several vocabularies are
not multiples of 64. The references do not go through hydralm: transformers' own loss of the
unmodified checkpoint, and a plain PyTorch loop (AutoModelForCausalLM, torch.optim.AdamW,
transformers' cosine schedule, clip_grad_norm_) fed the same rows in the order hydralm's sampler
deals them (a seeded randperm, consecutive batches, right padding, -100 labels).

Per family: the train losses of 3 steps equal the plain loop's, final-model reloads with the
trained logits and keeps vocab and tying, and LoRA trains with the family's default target modules
and its merged export gives the trained logits. For three families that differ in kind
(FULL_MATRIX: Llama, GPT-2's Conv1D/tied/learned positions, a mixture of experts) also: 2 processes
of full_shard equal 1, and a run killed with SIGKILL resumes to bit-equal weights (what they prove
is the sharding and checkpoint machinery, which the other families share with these).
"""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_weights, compose_config, final_weights, run_launcher_killed_in_save
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file
from test_distributed import _torchrun
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler

from launcher.cli.app import run_task

TOKENIZER = ROOT / "launcher" / "assets" / "tiny_bpe"

# The run every check shares (and the plain loop mirrors): 16 train rows, 4 per step, 3 steps.
SEED, STEPS, BATCH, MAX_GRAD_NORM = 11, 3, 4, 1.0
ADAMW = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-4

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)


@dataclass(frozen=True)
class Family:
    config: dict
    lora_targets: list  # the documented default (docs/config.md, LoRA)


FAMILIES = {
    "llama": Family(dict(model_type="llama", vocab_size=4099, **SMALL), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mistral": Family(dict(model_type="mistral", vocab_size=4096, sliding_window=16, **SMALL),
                      ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qwen2": Family(dict(model_type="qwen2", vocab_size=4111, **SMALL), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qwen3": Family(dict(model_type="qwen3", vocab_size=4096, head_dim=8, tie_word_embeddings=True, **SMALL),
                    ["q_proj", "k_proj", "v_proj", "o_proj"]),
    # final logit soft-capping, attention soft-capping (eager only), sqrt(hidden) embedding scale, tied
    "gemma2": Family(dict(model_type="gemma2", vocab_size=4105, head_dim=8, **SMALL),
                     ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "phi3": Family(dict(model_type="phi3", vocab_size=4101, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **SMALL), ["qkv_proj", "o_proj"]),
    # Conv1D layers, fused c_attn, tied embeddings, learned absolute positions
    "gpt2": Family(dict(model_type="gpt2", vocab_size=4133, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
                   ["c_attn", "attn.c_proj"]),
    # learned positions with an offset of 2, tied embeddings
    "opt": Family(dict(model_type="opt", vocab_size=4098, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
                       attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                  ["q_proj", "k_proj", "v_proj", "out_proj"]),
    "gpt_neox": Family(dict(model_type="gpt_neox", vocab_size=4103, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
                       ["query_key_value", "attention.dense"]),
    # mixture of experts: fused 3-D expert weights in memory, one tensor per expert on disk
    "qwen3_moe": Family(dict(model_type="qwen3_moe", vocab_size=4099, head_dim=8, moe_intermediate_size=32,
                             num_experts=4, num_experts_per_tok=2, **SMALL), ["q_proj", "k_proj", "v_proj", "o_proj"]),
}

# The families the multi-process and kill/resume checks run for (the `family` fixture, indirectly).
FULL_MATRIX = ["llama", "gpt2", "qwen3_moe"]


# ---------------------------------------------------------------- inputs: rows and checkpoints


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Token rows of 20-32 tokens with a masked prompt of 0-8 tokens, as data=preprocessed reads them."""
    rng = np.random.default_rng(0)
    vocab = len(AutoTokenizer.from_pretrained(TOKENIZER))

    def split(count):
        out = {"input_ids": [], "labels": []}
        for _ in range(count):
            ids = rng.integers(3, vocab, size=int(rng.integers(20, 33))).tolist()
            prompt = int(rng.integers(0, 9))
            out["input_ids"].append(ids)
            out["labels"].append([-100] * prompt + ids[prompt:])
        return out

    root = tmp_path_factory.mktemp("rows")
    data = {"train": split(16), "eval": split(8)}
    for name, columns in data.items():
        Dataset.from_dict(columns).save_to_disk(str(root / name))
    return {"dir": root, **data}


def save_checkpoint(config: dict, directory, edit=None):
    """A random model of `config` saved like a downloaded checkpoint, with the tiny tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    if edit is not None:
        edit(model)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, Family, checkpoint dir)."""
    name = request.param
    return name, FAMILIES[name], save_checkpoint(FAMILIES[name].config, tmp_path_factory.mktemp(name))


def overrides(checkpoint, rows, out, **extra):
    args = {
        "model": "local", "model.path": checkpoint, "data": "preprocessed",
        "data.train_ds": rows["dir"] / "train", "data.eval_ds": rows["dir"] / "eval",
        "data.train_bs": BATCH, "data.eval_bs": 8, "train.max_seq_len": 64, "train.max_steps": STEPS, "train.logging_steps": 1,
        "train.seed": SEED, "train.max_grad_norm": MAX_GRAD_NORM, "scheduler": "cosine",
        "scheduler.warmup_ratio": 0, "optimizer.lr": ADAMW["lr"], "optimizer.weight_decay": ADAMW["weight_decay"],
        "optimizer.eps": ADAMW["eps"], "optimizer.betas": "[{},{}]".format(*ADAMW["betas"]), "output_dir": out,
        "train.decay_norms_and_biases": True,  # the plain loop decays every parameter (grouping: test_weight_decay.py)
        **extra,
    }
    return [f"{key}={value}" for key, value in args.items()]


# ---------------------------------------------------------------- independent references


def pad(batch_rows, pad_id):
    """Right padding with the pad token; padded labels -100 (hydralm's collator, rewritten)."""
    width = max(len(ids) for ids in batch_rows["input_ids"])
    ids = torch.full((len(batch_rows["input_ids"]), width), pad_id)
    labels = torch.full_like(ids, -100)
    for i, (row_ids, row_labels) in enumerate(zip(batch_rows["input_ids"], batch_rows["labels"])):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


def pad_id(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def lm_loss(model, ids, labels, router_loss=True):
    """transformers' own causal-LM loss (the token mean; with a MoE router's term when the config
    asks for it), and the objective to train on (router_loss=False: without that term)."""
    output = model(input_ids=ids, labels=labels)
    if router_loss or output.aux_loss is None:
        return output.loss, output.loss
    return output.loss, output.loss - model.config.router_aux_loss_coef * output.aux_loss


@torch.no_grad()
def eval_loss(model, rows, pad_token):
    model.eval()
    return lm_loss(model, *pad(rows["eval"], pad_token))[0].item()


def plain_pytorch_run(checkpoint, rows, router_loss=True):
    """The per-step losses (transformers' loss) and the final model of a plain loop over the same rows."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    # hydralm's sampler order: DistributedSampler's seeding, one rank
    order = torch.randperm(len(rows["train"]["input_ids"]), generator=torch.Generator().manual_seed(SEED)).tolist()
    pad_token, losses = pad_id(checkpoint), []
    for step in range(STEPS):
        picked = order[step * BATCH : (step + 1) * BATCH]
        batch = {key: [rows["train"][key][i] for i in picked] for key in ("input_ids", "labels")}
        logged, objective = lm_loss(model, *pad(batch, pad_token), router_loss)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(logged.item())
    return losses, model.eval()


# ---------------------------------------------------------------- hydralm's outputs


def train_losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def safetensors_keys(directory):
    with safe_open(directory / "model.safetensors", "pt") as f:
        return set(f.keys())


def probe_logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def uninterrupted(family, rows, tmp_path_factory):
    """One process, a checkpoint every step: the run the other runs are compared with."""
    name, _, checkpoint = family
    out = tmp_path_factory.mktemp(f"{name}-run")
    args = overrides(checkpoint, rows, out, **{"train.checkpointing_enabled": "true", "train.save_steps": 1})
    return out, args, run_task(compose_config(args))


# ---------------------------------------------------------------- the checks


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_loading_changes_nothing_and_training_equals_a_plain_pytorch_loop(family, rows, uninterrupted):
    name, spec, checkpoint = family
    out, _, summary = uninterrupted
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    pad_token = pad_id(checkpoint)
    assert summary["initial_eval_loss"] == pytest.approx(eval_loss(original, rows, pad_token), rel=LOSS_RTOL)

    losses, trained = plain_pytorch_run(checkpoint, rows)
    assert train_losses(out) == pytest.approx(losses, rel=LOSS_RTOL)

    # final-model: the checkpoint's vocabulary and tying; tied weights stored once; the trained logits
    exported = out / "final-model"
    config = json.loads((exported / "config.json").read_text())
    source = json.loads((checkpoint / "config.json").read_text())
    assert config["vocab_size"] == source["vocab_size"]
    assert config.get("tie_word_embeddings") == source.get("tie_word_embeddings")
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    head, embedding = reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    if original.config.tie_word_embeddings:
        assert head.data_ptr() == embedding.data_ptr()
        assert len(safetensors_keys(exported)) == len(safetensors_keys(checkpoint))  # one tensor for both
    assert safetensors_keys(exported) == safetensors_keys(checkpoint)
    assert summary["final_eval_loss"] == pytest.approx(eval_loss(reloaded, rows, pad_token), rel=LOSS_RTOL)
    ids, _ = pad(rows["eval"], pad_token)
    torch.testing.assert_close(probe_logits(reloaded, ids), probe_logits(trained, ids), rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", FULL_MATRIX, indirect=True)
def test_two_processes_of_full_shard_equal_one(family, rows, uninterrupted, tmp_path):
    name, _, checkpoint = family
    reference, out = uninterrupted[0], tmp_path / "run"
    args = overrides(checkpoint, rows, out, **{"data.train_bs": BATCH // 2, "sharding": "full_shard",
                                                "sharding.low_cpu_mem_usage": "true"})
    [(code, _, err)] = _torchrun(2, args, cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=LOSS_RTOL)
    expected = load_file(reference / "final-model" / "model.safetensors")
    actual = load_file(out / "final-model" / "model.safetensors")
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=WEIGHT_ATOL, msg=key)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_lora_with_the_family_default_targets_and_its_merged_export(family, rows, tmp_path):
    from peft import PeftModel

    name, spec, checkpoint = family
    out = tmp_path / "lora"
    summary = run_task(compose_config(overrides(checkpoint, rows, out, peft="lora", **{
        "export.merge_lora": "true", "peft.lora_dropout": 0.0, "optimizer.lr": 1e-2})))
    adapter = json.loads((out / "final-model" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(spec.lora_targets)
    assert adapter["base_model_name_or_path"] == str(checkpoint)  # the checkpoint itself, unchanged

    pad_token = pad_id(checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(out / "final-model-merged", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                                        out / "final-model")
    ids, _ = pad(rows["eval"], pad_token)
    torch.testing.assert_close(probe_logits(merged, ids), probe_logits(adapted, ids), rtol=0, atol=1e-4)
    # the merged model is the model hydralm trained and evaluated in memory
    assert summary["final_eval_loss"] == pytest.approx(eval_loss(merged, rows, pad_token), rel=LOSS_RTOL)
    adapters = load_file(out / "final-model" / "adapter_model.safetensors")
    assert all(tensor.abs().sum() > 0 for key, tensor in adapters.items() if "lora_B" in key)  # B starts at 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FULL_MATRIX, indirect=True)
def test_a_run_killed_with_sigkill_resumes_to_bit_equal_weights(family, uninterrupted, tmp_path):
    reference, args, _ = uninterrupted
    out = tmp_path / "killed"
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in args]
    killed = run_launcher_killed_in_save(2, args, cwd=tmp_path)  # inside the save of step 2
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-00000001" / "COMPLETE").is_file()
    assert not (out / "final-model").exists()
    run_task(compose_config(args))  # the same command
    assert_same_weights(final_weights(out), final_weights(reference))
    assert train_losses(out) == train_losses(reference)


# ---------------------------------------------------------------- beyond the matrix

# Families with a preset or a close relative in the matrix: loading and single-process training only.
MORE_FAMILIES = {
    # the Gemma 3 text models (gemma3_1b): an embedding-scale buffer, sliding and global layers, tied
    "gemma3_text": dict(model_type="gemma3_text", vocab_size=4101, head_dim=8, **SMALL),
    "mixtral": dict(model_type="mixtral", vocab_size=4099, num_local_experts=4, num_experts_per_tok=2, **SMALL),
}


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@pytest.mark.parametrize("name", list(MORE_FAMILIES))
def test_more_families_load_unchanged_and_train_like_a_plain_pytorch_loop(name, rows, tmp_path):
    checkpoint = save_checkpoint(MORE_FAMILIES[name], tmp_path / name)
    summary = run_task(compose_config(overrides(checkpoint, rows, tmp_path / "run")))
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert summary["initial_eval_loss"] == pytest.approx(eval_loss(original, rows, pad_id(checkpoint)), rel=LOSS_RTOL)
    losses, _ = plain_pytorch_run(checkpoint, rows)
    assert train_losses(tmp_path / "run") == pytest.approx(losses, rel=LOSS_RTOL)
    assert safetensors_keys(tmp_path / "run" / "final-model") == safetensors_keys(checkpoint)



def test_a_checkpoint_whose_logits_share_a_large_offset_keeps_its_loss_and_vocabulary(rows, tmp_path):
    """The case that found the bug: GPT-2 style, 4133 rows (not a multiple of 64), an untied head,
    and every logit shifted by about -50 (as GPT-2's are): padded rows with fresh weights (logits
    near 0) would take the softmax over."""
    def offset_logits(model):
        with torch.no_grad():
            model.transformer.ln_f.bias.fill_(3.0)  # every final hidden state gets a +3 component...
            model.lm_head.weight -= 0.5  # ...which every head row turns into a shared -0.5 * 3 * 32

    config = dict(FAMILIES["gpt2"].config, tie_word_embeddings=False)
    checkpoint = save_checkpoint(config, tmp_path / "gpt2-untied", offset_logits)
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    pad_token = pad_id(checkpoint)
    ids, _ = pad(rows["eval"], pad_token)
    assert probe_logits(original, ids).mean() < -30
    expected = eval_loss(original, rows, pad_token)

    summary = run_task(compose_config(overrides(checkpoint, rows, tmp_path / "run", **{"train.max_steps": 1})))
    assert summary["initial_eval_loss"] == pytest.approx(expected, rel=LOSS_RTOL)
    exported = json.loads((tmp_path / "run" / "final-model" / "config.json").read_text())
    assert exported["vocab_size"] == 4133 and exported["tie_word_embeddings"] is False
    assert safetensors_keys(tmp_path / "run" / "final-model") == safetensors_keys(checkpoint)
    evaluated = run_task(compose_config(["task=evaluate", *overrides(checkpoint, rows, tmp_path / "eval")]))
    assert evaluated["eval_loss"] == pytest.approx(expected, rel=LOSS_RTOL)


def test_only_a_random_init_is_padded_and_a_checkpoint_grows_only_for_a_bigger_tokenizer(tmp_path):
    from launcher.distributed import World
    from launcher.model.modeling import build_model, load_tokenizer

    world = World(0, 0, 1, 1, torch.device("cpu"))
    random_init = compose_config(["model.config.vocab_size=4099"]).model  # the tiny preset: random init
    tokenizer = load_tokenizer(random_init)
    assert build_model(random_init, tokenizer, world).get_input_embeddings().num_embeddings == 4160

    # a checkpoint of 4000 rows with the 4096-token tokenizer: rows for the missing ids, nothing more
    checkpoint = save_checkpoint(dict(FAMILIES["llama"].config, vocab_size=4000), tmp_path / "small-vocab")
    model = build_model(compose_config(["model=local", f"model.path={checkpoint}"]).model, tokenizer, world)
    assert model.get_input_embeddings().num_embeddings == model.get_output_embeddings().weight.shape[0] == 4096
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert torch.equal(model.get_input_embeddings().weight[:4000], original.get_input_embeddings().weight)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_mixture_of_experts_trains_with_its_router_loss_as_transformers_adds_it(rows, tmp_path):
    """output_router_logits=true in the config: transformers adds router_aux_loss_coef x the
    load-balancing loss to its loss, and so does hydralm (once per trained token, so the loss of
    one batch is transformers' loss of it, and with several it is their token-weighted mean)."""
    config = dict(FAMILIES["qwen3_moe"].config, output_router_logits=True, router_aux_loss_coef=1.0)
    checkpoint = save_checkpoint(config, tmp_path / "moe")
    summary = run_task(compose_config(overrides(checkpoint, rows, tmp_path / "run", **{"data.eval_bs": 8})))
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert summary["initial_eval_loss"] == pytest.approx(eval_loss(original, rows, pad_id(checkpoint)), rel=LOSS_RTOL)
    losses, _ = plain_pytorch_run(checkpoint, rows)
    assert train_losses(tmp_path / "run") == pytest.approx(losses, rel=LOSS_RTOL)
    without_router_loss, _ = plain_pytorch_run(checkpoint, rows, router_loss=False)
    assert without_router_loss[1:] != pytest.approx(losses[1:], rel=LOSS_RTOL)  # the check can tell


def test_a_multimodal_checkpoint_is_refused_naming_what_to_use(tmp_path):
    """Gemma 3 4B and up are vision-language checkpoints (Gemma3ForConditionalGeneration)."""
    from conftest import assert_rejected_before_any_work

    text = dict(vocab_size=4096, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=64)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=28,
                  patch_size=14)
    checkpoint = save_checkpoint(dict(model_type="gemma3", text_config=text, vision_config=vision), tmp_path / "gemma3")
    assert_rejected_before_any_work(["model=local", f"model.path={checkpoint}"],
                                    "model_type=gemma3 is a multimodal model", tmp_path)
