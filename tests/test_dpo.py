"""task=dpo against an independent DPO written here: a plain PyTorch loop on AutoModelForCausalLM
with a frozen copy as the reference, pairs tokenized by hand, the sampler's order re-derived.

The pairs are small (64-token sequences, 4 pairs a step, 18 train pairs: 4 steps an epoch and
2 pairs left out of each epoch) so that every run takes seconds.
"""

import base64
import copy
import json
import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_rejected_before_any_work, assert_same_weights, compose_config, final_weights, run_launcher,
                      run_launcher_killed_in_save)
from peft import PeftModel
from test_distributed import _torchrun
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from launcher.cli.app import run_task
from launcher.schema import ASSETS_DIR

LN2 = math.log(2)
TRAIN_PAIRS, EVAL_PAIRS, GLOBAL_BATCH, STEPS = 18, 7, 4, 8  # 2 epochs of 4 steps; 2 ranks pad eval
BETA, SMOOTHING = 0.5, 0.1
SMALL = ["task=dpo", "data=files", "train.max_seq_len=64", f"train.max_steps={STEPS}", "train.epochs=2",
         "train.logging_steps=1", "data.eval_bs=4", f"dpo.beta={BETA}", f"dpo.label_smoothing={SMOOTHING}",
         "optimizer.lr=1e-3"]
ROW_KEYS = ("step", "epoch", "train_loss", "eval_loss", "rewards_chosen", "rewards_rejected", "reward_margin",
            "reward_accuracy", "eval_reward_accuracy", "eval_reward_margin", "grad_norm", "lr", "tokens_seen")


def pydoc_pairs(count: int, offset: int) -> list[dict]:
    """Prompt: 8 words of a pydoc topic; chosen: the 10 that follow; rejected: those reversed."""
    from pydoc_data.topics import topics

    words = " ".join(text for _, text in sorted(topics.items())[:6]).split()
    rows = []
    for i in range(offset, offset + count):
        prompt, response = words[18 * i:18 * i + 8], words[18 * i + 8:18 * i + 18]
        rows.append({"prompt": " ".join(prompt), "chosen": " " + " ".join(response),
                     "rejected": " " + " ".join(reversed(response))})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pair files and a saved random-init Llama both implementations start from."""
    root = tmp_path_factory.mktemp("dpo")
    for name, rows in (("train", pydoc_pairs(TRAIN_PAIRS, 0)), ("eval", pydoc_pairs(EVAL_PAIRS, TRAIN_PAIRS))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_bpe")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    args = [*SMALL, f"data.load_path={root / 'train.jsonl'}", f"data.eval_split={root / 'eval.jsonl'}",
            f"model.path={root / 'model'}", f"model.tokenizer={ASSETS_DIR / 'tiny_bpe'}"]
    return root, args


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out) -> list[dict]:
    return [r for r in rows_of(out) if "train_loss" in r]


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """One uninterrupted in-process run, checkpointing every 2 steps."""
    out = tmp_path_factory.mktemp("single")
    summary = run_task(compose_config([*setup[1], f"data.train_bs={GLOBAL_BATCH}", "train.checkpointing_enabled=true",
                                       "train.save_steps=2", f"output_dir={out}"]))
    return out, summary


# ---------------------------------------------------------------- the independent implementation


def encode(tokenizer, row: dict, side: str):
    """[BOS] prompt response [EOS]; the response and EOS are trained."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
    response = tokenizer(row[side], add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *prompt, *response, tokenizer.eos_token_id]
    return ids, [False] * (1 + len(prompt)) + [True] * (len(response) + 1)


def log_probs(model, sequences) -> torch.Tensor:
    """Sum of log p(token | prefix) over each sequence's trained tokens."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in sequences])
    trained = torch.tensor([mask + [False] * (width - len(mask)) for _, mask in sequences])
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    token_log_probs = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None])[..., 0]
    return (token_log_probs * trained[:, 1:]).sum(1)


def plain_dpo(model, reference, pairs, beta, smoothing=0.0):
    """Mean loss of a batch of encoded pairs, and the mean chosen/rejected rewards and accuracy.
    Conservative DPO is the cross-entropy of P(chosen preferred) = sigmoid(logits) against the
    smoothed label 1 - smoothing."""
    chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
    with torch.no_grad():
        reference_chosen, reference_rejected = log_probs(reference, chosen), log_probs(reference, rejected)
    policy_chosen, policy_rejected = log_probs(model, chosen), log_probs(model, rejected)
    logits = beta * ((policy_chosen - policy_rejected) - (reference_chosen - reference_rejected))
    loss = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1 - smoothing))
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return loss, {"rewards_chosen": chosen_rewards.mean().item(), "rewards_rejected": rejected_rewards.mean().item(),
                  "reward_accuracy": (chosen_rewards > rejected_rewards).double().mean().item()}


def plain_pytorch_run(root, seed=11):
    """The hydralm config's run: AdamW (conf/optimizer/adamw.yaml with lr 1e-3), cosine with 5%
    warmup as documented (update s of W warmup updates at s/(W+1) of the peak, then cosine from the
    peak at update W+1), clipping at 1.0; epoch e's order is randperm(seed + e), 4 pairs a step."""
    pairs = encoded_pairs(root, "train")
    model = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="sdpa")
    reference = copy.deepcopy(model).eval()
    # Llama has no biases; its norm weights (input_layernorm, post_attention_layernorm, norm) are not decayed
    decayed = [p for name, p in model.named_parameters() if not name.endswith("norm.weight")]
    spared = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": spared, "weight_decay": 0.0}], lr=1e-3,
                                  weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5)
    warmup = math.ceil(0.05 * STEPS)

    def lr_of_update(s: int) -> float:
        if s <= warmup:
            return 1e-3 * s / (warmup + 1)
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1 - warmup) / (STEPS - warmup)))

    steps = []
    for epoch in range(2):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(pairs) - GLOBAL_BATCH + 1, GLOBAL_BATCH):
            batch = [pairs[i] for i in order[start:start + GLOBAL_BATCH]]
            loss, metrics = plain_dpo(model, reference, batch, BETA, SMOOTHING)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr_of_update(len(steps) + 1)
            optimizer.step()
            optimizer.zero_grad()
            steps.append({"train_loss": loss.item(), **metrics})
    return steps


def encoded_pairs(root, split):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_bpe")
    return [(encode(tokenizer, row, "chosen"), encode(tokenizer, row, "rejected"))
            for row in map(json.loads, (root / f"{split}.jsonl").read_text().splitlines())]


def initial_log_probs(root) -> torch.Tensor:
    """(pairs, 2): chosen and rejected log-probs of every train then eval pair, initial model."""
    model = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="sdpa").eval()
    pairs = encoded_pairs(root, "train") + encoded_pairs(root, "eval")
    with torch.no_grad():
        return torch.stack([log_probs(model, [p[0] for p in pairs]), log_probs(model, [p[1] for p in pairs])], 1)


# ---------------------------------------------------------------- tests


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_step_0_loss_is_ln2_and_the_run_equals_a_plain_pytorch_dpo_loop(setup, single):
    out, summary = single
    rows = rows_of(out)
    initial_eval = rows[0]
    assert initial_eval["step"] == 0
    # policy == reference bit for bit: every reward is exactly 0, the loss ln 2 up to fp64 averaging
    assert initial_eval["eval_loss"] == pytest.approx(LN2, rel=1e-15, abs=0)
    assert initial_eval["eval_rewards_chosen"] == initial_eval["eval_rewards_rejected"] == 0.0
    first_step = train_rows(out)[0]
    assert first_step["rewards_chosen"] == first_step["rewards_rejected"] == first_step["reward_margin"] == 0.0
    assert first_step["train_loss"] == pytest.approx(LN2, rel=1e-7)  # summed in fp32 by the skeleton

    expected = plain_pytorch_run(setup[0])
    actual = train_rows(out)
    assert len(actual) == len(expected) == STEPS
    for step, (mine, theirs) in enumerate(zip(actual, expected), start=1):
        assert mine["step"] == step
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5), step
        for name in ("rewards_chosen", "rewards_rejected"):
            assert mine[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), (step, name)
        assert mine["reward_accuracy"] == theirs["reward_accuracy"], step
    assert summary["steps"] == STEPS and actual[-1]["train_loss"] < 0.75 * LN2  # it trains


@pytest.mark.slow
def test_two_process_full_shard_equals_one_process(setup, single, tmp_path):
    out = tmp_path / "run"
    args = [*setup[1], "sharding=full_shard", f"data.train_bs={GLOBAL_BATCH // 2}", f"output_dir={out}"]
    [(code, _, err)] = _torchrun(2, args, cwd=tmp_path)
    assert code == 0, err
    expected = train_rows(single[0])
    for mine, theirs in zip(train_rows(out), expected, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["reward_margin"] == pytest.approx(theirs["reward_margin"], rel=1e-4, abs=1e-6)
    # 7 eval pairs on 2 ranks: one padding row, which must weigh nothing
    eval_rows = [r for r in rows_of(out) if "eval_loss" in r]
    assert eval_rows[0]["eval_loss"] == pytest.approx(LN2, rel=1e-15, abs=0)
    for mine, theirs in zip(eval_rows, [r for r in rows_of(single[0]) if "eval_loss" in r], strict=True):
        assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
        assert mine["eval_reward_accuracy"] == theirs["eval_reward_accuracy"]


@pytest.mark.slow
def test_kill_9_in_a_save_then_the_same_command_is_bit_equal(setup, single, tmp_path):
    """The reference log-probs come from the checkpoint: recomputed from the step-2 weights, the
    resumed run would diverge."""
    out = tmp_path / "run"
    args = [*setup[1], f"data.train_bs={GLOBAL_BATCH}", "train.checkpointing_enabled=true", "train.save_steps=2",
            f"output_dir={out}"]
    killed = run_launcher_killed_in_save(6, args, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((out / "checkpoints" / "checkpoint-00000004" / "trainer_state.json").read_text())
    saved = np.frombuffer(base64.b64decode(state["task"]["reference_log_probs"]), dtype="<f4").reshape(-1, 2)
    torch.testing.assert_close(torch.from_numpy(saved.copy()), initial_log_probs(setup[0]), rtol=1e-5, atol=1e-5)
    result = run_launcher(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout and "reward_accuracy" in result.stdout
    assert_same_weights(final_weights(out), final_weights(single[0]))
    strip = lambda rows: [{k: r[k] for k in ROW_KEYS if k in r} for r in rows]  # noqa: E731 (no timings)
    assert strip(rows_of(out)) == strip(rows_of(single[0]))


LORA = ["peft=lora", "peft.r=4", "peft.lora_dropout=0", "optimizer.lr=1e-2", "train.checkpointing_enabled=true",
        "train.save_steps=4"]


@pytest.fixture(scope="module")
def lora_single(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    summary = run_task(compose_config([*setup[1], *LORA, f"data.train_bs={GLOBAL_BATCH}", f"output_dir={out}"]))
    return out, summary


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_lora_reference_is_the_base_with_adapters_switched_off(setup, lora_single):
    """peft=lora: nothing in the checkpoint but adapters; the eval rewards equal beta * log-prob
    differences between the exported adapters and the base, computed here."""
    out, summary = lora_single
    initial_eval = rows_of(out)[0]
    assert initial_eval["eval_loss"] == pytest.approx(LN2, rel=1e-15, abs=0)
    assert initial_eval["eval_reward_margin"] == 0.0  # peft starts B at zero: policy == base
    state = json.loads((out / "checkpoints" / "checkpoint-00000008" / "trainer_state.json").read_text())
    assert state["task"] == {}

    pairs = encoded_pairs(setup[0], "eval")
    base = AutoModelForCausalLM.from_pretrained(setup[0] / "model").eval()
    policy = PeftModel.from_pretrained(copy.deepcopy(base), out / "final-model").eval()
    with torch.no_grad():
        _, metrics = plain_dpo(policy, base, pairs, BETA)
    final = summary["final_eval"]
    assert final["eval_rewards_chosen"] == pytest.approx(metrics["rewards_chosen"], rel=1e-4)
    assert final["eval_rewards_rejected"] == pytest.approx(metrics["rewards_rejected"], rel=1e-4)
    assert final["eval_reward_accuracy"] == metrics["reward_accuracy"]
    assert final["eval_rewards_chosen"] != 0.0


@pytest.mark.slow
def test_two_process_lora_shard_grad_op_equals_one_process(setup, lora_single, tmp_path):
    out = tmp_path / "run"
    [(code, _, err)] = _torchrun(2, [*setup[1], *LORA, "sharding=shard_grad_op", f"data.train_bs={GLOBAL_BATCH // 2}",
                                     f"output_dir={out}"], cwd=tmp_path)
    assert code == 0, err
    for mine, theirs in zip(train_rows(out), train_rows(lora_single[0]), strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


def test_pairs_are_framed_cut_and_held_out_like_the_spec(tmp_path):
    """Prompts lose their start (after BOS) only as far as needed, never below
    dpo.max_prompt_len; responses lose their end; without an eval split every eval_every-th pair
    is eval; ids run over train then eval."""
    from launcher.data.pairs import preference_splits
    from launcher.distributed import distributed
    from launcher.model.modeling import load_tokenizer

    long_prompt = " ".join(f"word{i}" for i in range(40))
    rows = [{"q": f"question {i}", "good": f" answer {i}", "bad": " no"} for i in range(12)]
    rows[3] = {"q": long_prompt, "good": " " + " ".join(f"answer{i}" for i in range(30)), "bad": " no"}
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(["task=dpo", "data=files", f"data.load_path={tmp_path / 'pairs.jsonl'}", "data.eval_every=5",
                          "train.max_seq_len=32", "dpo.max_prompt_len=12", "dpo.prompt_field=q",
                          "dpo.chosen_field=good", "dpo.rejected_field=bad", f"output_dir={tmp_path}"])
    with distributed() as world:
        tokenizer = load_tokenizer(cfg.model)
        splits = preference_splits(cfg, tokenizer, world)
    eval_rows, train_rows_ = [rows[i] for i in (0, 5, 10)], [r for i, r in enumerate(rows) if i % 5]
    assert splits["train"]["id"] == list(range(9)) and splits["eval"]["id"] == [9, 10, 11]

    def tokens(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    bos, eos, ignore = tokenizer.bos_token_id, tokenizer.eos_token_id, -100
    for split, raw in ((splits["train"], train_rows_), (splits["eval"], eval_rows)):
        for row, pair in zip(raw, split):
            prompt, chosen, rejected = tokens(row["q"]), tokens(row["good"]), tokens(row["bad"])
            longest = 2 + len(prompt) + max(len(chosen), len(rejected))
            keep = len(prompt) - max(0, min(longest - 32, len(prompt) - 12))
            prompt = prompt[len(prompt) - keep:]
            for side, response in (("chosen", chosen), ("rejected", rejected)):
                ids = ([bos, *prompt, *response, eos])[:32]
                assert pair[f"{side}_input_ids"] == ids
                assert pair[f"{side}_labels"] == [ignore] * (1 + len(prompt)) + ids[1 + len(prompt):]
    cut = splits["train"][2]  # rows[3]: prompt cut to 12 tokens, the chosen response to fit 32
    assert cut["chosen_labels"].count(ignore) == 13 and len(cut["chosen_input_ids"]) == 32
    assert cut["chosen_input_ids"][-1] != eos


def test_pairs_with_the_same_chosen_and_rejected_are_counted_in_a_warning(tmp_path, caplog):
    """They carry no preference: the run trains them to no effect, so the user is told how many."""
    from launcher.data.pairs import preference_splits
    from launcher.distributed import distributed
    from launcher.model.modeling import load_tokenizer

    rows = [{"q": f"question {i}", "good": f" answer {i}", "bad": f" answer {i}" if i % 4 == 0 else " no"}
            for i in range(12)]  # rows 0, 4, 8 identical
    common = " the same start of both responses, long enough to fill the row"
    rows.append({"q": "cut", "good": common + " x" * 9, "bad": common + " y" * 9})  # equal once cut
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(["task=dpo", "data=files", f"data.load_path={tmp_path / 'pairs.jsonl'}",
                          "train.max_seq_len=8", "dpo.max_prompt_len=2", "dpo.prompt_field=q",
                          "dpo.chosen_field=good", "dpo.rejected_field=bad", f"output_dir={tmp_path}"])
    with distributed() as world, caplog.at_level("WARNING"):
        tokenizer = load_tokenizer(cfg.model)
        splits = preference_splits(cfg, tokenizer, world)
    pairs = [p for split in splits.values() for p in split]
    identical = sum(p["chosen_input_ids"] == p["rejected_input_ids"] and p["chosen_labels"] == p["rejected_labels"]
                    for p in pairs)
    assert identical >= 4 and len(pairs) == 13  # counted, not dropped
    assert (f"{identical} of 13 pairs have the same chosen and rejected response (after fitting to "
            "train.max_seq_len)") in caplog.text


def test_chat_pairs_train_exactly_the_response_turn(tmp_path):
    """data.format=chat: the prompt's messages plus each response rendered by the chat template;
    the trained tokens are the response's content and its end-of-turn token, nothing else, and a
    pair that is not a conversation is dropped and counted."""
    from launcher.cli.validate import check_config
    from launcher.data.pairs import preference_splits
    from launcher.distributed import World

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    rows = [{"prompt": prompt, "chosen": "A mutable sequence.", "rejected": [{"role": "assistant", "content": "No idea."}]}
            for _ in range(12)]
    rows.append({"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "x", "rejected": "y"})  # unknown role
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = compose_config(["task=dpo", "data=files", f"data.load_path={tmp_path / 'chat.jsonl'}", "data.format=chat",
                          f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"])
    check_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_bpe")
    splits = preference_splits(cfg, tokenizer, World(0, 0, 1, 1, torch.device("cpu")))
    pair = splits["train"][0]
    for side, answer in (("chosen", "A mutable sequence."), ("rejected", "No idea.")):
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        assert tokenizer.decode(pair[f"{side}_input_ids"]) == text  # the template's rendering, whole
        trained = [t for t, label in zip(pair[f"{side}_input_ids"], pair[f"{side}_labels"]) if label != -100]
        assert tokenizer.decode(trained) == answer + tokenizer.eos_token  # the turn and its end, nothing else
    report = json.loads(next((tmp_path / "cache").rglob("report.json")).read_text())
    assert report["dropped_malformed"] == 1 and report["pairs"] == 13


@pytest.mark.parametrize("overrides,message", [
    (["dpo.beta=0"], "dpo.beta=0"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5 must be in [0, 0.5)"),
    (["dpo.max_prompt_len=255"], "dpo.max_prompt_len=255 must leave room"),
    (["dpo.max_prompt_len=0"], "dpo.max_prompt_len=0 must be >= 1"),
    (["data.separator=Answer:"], "data.separator does not apply to task=dpo"),
    (["data.format=alpaca"], "data.format=alpaca does not apply to task=dpo: preference pairs are text or chat"),
    (["peft=lora", "peft.inference_mode=true"], "task=dpo would train nothing"),
])
def test_bad_dpo_settings_are_named_before_any_work(overrides, message, tmp_path):
    assert_rejected_before_any_work(["task=dpo", "data=pydoc_pairs", *overrides], message, tmp_path)


def test_tokenized_rows_for_dpo_are_refused_naming_what_it_reads(tmp_path):
    from datasets import Dataset

    packed = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]})  # what task=preprocess writes
    for split in ("train", "eval"):
        packed.save_to_disk(str(tmp_path / split))
    assert_rejected_before_any_work(["task=dpo", "data=preprocessed", f"data.train_ds={tmp_path / 'train'}",
                                     f"data.eval_ds={tmp_path / 'eval'}"],
                                    "task=dpo reads prompt/chosen/rejected pairs", tmp_path)


def test_text_data_for_dpo_names_the_missing_column(tmp_path):
    from launcher.errors import ConfigError

    with pytest.raises(ConfigError, match="the preference data has no column 'prompt'.*its columns: text"):
        run_task(compose_config(["task=dpo", "data=pydoc", f"output_dir={tmp_path / 'out'}"]))


@pytest.mark.slow  # a full-length training run (minutes on 2 cores)
def test_the_embedded_default_learns_to_prefer_real_text(tmp_path):
    """task=dpo data=pydoc_pairs, shortened: eval pairs come from topics training never saw."""
    summary = run_task(compose_config(["task=dpo", "data=pydoc_pairs", "train.max_steps=40",
                                       "train.logging_steps=40", f"output_dir={tmp_path}"]))
    final = summary["final_eval"]
    assert summary["initial_eval_loss"] == pytest.approx(LN2, rel=1e-15, abs=0)
    assert final["eval_reward_accuracy"] > 0.7 and final["eval_reward_margin"] > 0.2
    assert summary["final_eval_loss"] < LN2 - 0.1


def test_task_dpo_alone_runs_on_the_embedded_pairs_and_any_data_choice_still_wins():
    """The first thing a user types, `python -m launcher task=dpo`, must be a valid run."""
    from launcher.cli.validate import check_config

    alone = compose_config(["task=dpo"])
    assert (alone.data.name, alone.data.source) == ("pydoc_pairs", "pydoc_pairs")
    check_config(alone)  # passes every check before any work
    chosen = compose_config(["task=dpo", "data=files", "data.load_path=pairs.jsonl"])
    assert (chosen.data.name, chosen.data.load_path) == ("files", "pairs.jsonl")
    assert compose_config([]).data.name == "pydoc"  # task=train keeps its default
