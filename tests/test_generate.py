"""task=generate against transformers' own `model.generate` on the same saved model and prompt
(each prompt alone, unpadded), for an exported model, a chat template, a LoRA adapter directory
and a training checkpoint; sampling reproducible by seed; one-line errors before any work."""

import json
import shutil

import pytest
import torch
from conftest import QUICK, assert_rejected_before_any_work, compose_config
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from launcher.cli.app import run_task
from launcher.schema import ASSETS_DIR

PROMPTS = ["The quick brown fox", "def main(): return", "x"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random-init Llama with the tiny tokenizer, saved as a HF directory (chat template removed),
    and the same with the tokenizer's chat template."""
    root = tmp_path_factory.mktemp("generate")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_bpe")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "chat")
    tokenizer.save_pretrained(root / "chat")
    shutil.copytree(root / "chat", root / "text")
    (root / "text" / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(root / "text").chat_template is None
    return root


def generations(out) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def run_generate(checkpoint, out, *extra):
    run_task(compose_config(["task=generate", f"checkpoint={checkpoint}", f"generate.max_new_tokens={NEW_TOKENS}",
                             f"output_dir={out}", *extra]))
    return generations(out)


def prompts_arg(prompts) -> str:
    return "generate.prompts=" + json.dumps(prompts)


def transformers_greedy(model, tokenizer, ids: list[int]) -> str:
    """transformers' generate on one unpadded prompt."""
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


def test_greedy_equals_transformers_generate_in_left_padded_batches(saved, tmp_path):
    rows = run_generate(saved / "text", tmp_path, prompts_arg(PROMPTS), "generate.batch_size=2")
    tokenizer = AutoTokenizer.from_pretrained(saved / "text")
    model = AutoModelForCausalLM.from_pretrained(saved / "text").eval()
    assert [row["prompt"] for row in rows] == PROMPTS
    for row in rows:  # a text model reads BOS then the prompt, as hydralm frames text in training
        ids = [tokenizer.bos_token_id, *tokenizer(row["prompt"], add_special_tokens=False).input_ids]
        assert row["completion"] == transformers_greedy(model, tokenizer, ids), row["prompt"]
    assert len({row["completion"] for row in rows}) > 1  # the outputs depend on the prompt


def test_a_chat_model_gets_the_template_and_prompts_come_from_a_jsonl_file(saved, tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n\n" + json.dumps({"question": conversation}) + "\n")
    rows = run_generate(saved / "chat", tmp_path / "out", f"generate.prompts_file={prompts}",
                        "generate.prompt_field=question")
    tokenizer = AutoTokenizer.from_pretrained(saved / "chat")
    model = AutoModelForCausalLM.from_pretrained(saved / "chat").eval()
    expected = []
    for messages in ([{"role": "user", "content": "What is 2 + 2?"}], conversation):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        expected.append(transformers_greedy(model, tokenizer, list(ids["input_ids"])))
    assert [row["completion"] for row in rows] == expected


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_sampling_is_reproducible_by_seed(saved, tmp_path):
    sampling = [prompts_arg(PROMPTS), "generate.do_sample=true", "generate.temperature=1.5", "generate.top_p=0.95"]
    first = run_generate(saved / "text", tmp_path / "a", *sampling, "generate.seed=3")
    again = run_generate(saved / "text", tmp_path / "b", *sampling, "generate.seed=3")
    other = run_generate(saved / "text", tmp_path / "c", *sampling, "generate.seed=4")
    assert first == again
    assert first != other


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_lora_adapter_directory_generates_what_peft_generates(saved, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(saved / "text")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # peft starts B at 0: make the adapters change the output
    peft_model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(saved / "text").save_pretrained(tmp_path / "adapter")
    rows = run_generate(tmp_path / "adapter", tmp_path / "out", prompts_arg(PROMPTS[:2]))
    tokenizer = AutoTokenizer.from_pretrained(saved / "text")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved / "text"), tmp_path / "adapter")
    plain = run_generate(saved / "text", tmp_path / "base", prompts_arg(PROMPTS[:2]))
    for row, without in zip(rows, plain, strict=True):
        ids = [tokenizer.bos_token_id, *tokenizer(row["prompt"], add_special_tokens=False).input_ids]
        assert row["completion"] == transformers_greedy(reference.eval(), tokenizer, ids)
    assert rows != plain  # the adapters were applied


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_training_checkpoint_generates_what_its_final_model_generates(tmp_path):
    """The default tiny run, checkpointed at its last step: loaded without an export, the
    checkpoint's weights are the final model's, so greedy outputs are equal."""
    run = tmp_path / "run"
    run_task(compose_config([*QUICK, "train.checkpointing_enabled=true", "train.save_steps=4", f"output_dir={run}"]))
    [checkpoint] = sorted((run / "checkpoints").iterdir())
    text = ["generate.apply_chat_template=false", prompts_arg(PROMPTS)]
    from_checkpoint = run_generate(checkpoint, tmp_path / "a", *text)
    from_final = run_generate(run / "final-model", tmp_path / "b", *text)
    assert from_checkpoint == from_final
    # and task=evaluate still reads the same inputs
    evaluated = run_task(compose_config(["task=evaluate", f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'e'}"]))
    assert evaluated["eval_loss"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint=/nonexistent/final-model", "generate.prompt=hi"], "checkpoint=/nonexistent/final-model does not exist"),
    (["generate.prompt=hi", "generate.do_sample=true", "generate.temperature=0"], "generate.temperature=0.0 must be > 0"),
    (["generate.prompts=[]"], "no prompts in generate.prompts"),
    (["generate.prompts=['ok', ' ']"], "prompt #1 is ' '"),
    ([], "needs exactly one of generate.prompt"),
    (["generate.prompt=hi", "generate.prompts_file=/nonexistent.jsonl"], "needs exactly one of"),
    (["generate.prompts_file=/nonexistent.jsonl"], "generate.prompts_file=/nonexistent.jsonl does not exist"),
    (["generate.prompt=hi", "generate.top_p=0", "generate.do_sample=true"], "generate.top_p=0.0 must be in (0, 1]"),
])
def test_bad_generate_input_is_one_line_before_any_work(saved, overrides, message, tmp_path):
    checkpoint = [] if any(o.startswith("checkpoint=") for o in overrides) else [f"checkpoint={saved / 'text'}"]
    assert_rejected_before_any_work(["task=generate", *checkpoint, *overrides], message, tmp_path)


def test_the_random_init_default_is_refused(tmp_path):
    assert_rejected_before_any_work(["task=generate", "generate.prompt=hi"], "needs checkpoint=<run>/final-model",
                                    tmp_path)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_lora_training_checkpoint_generates_what_its_final_adapters_generate(tmp_path):
    """A peft=lora checkpoint holds the adapters only: its base is rebuilt (the run's base-model/,
    a random init here) and the adapters loaded onto it; at the last step that is the run's
    final-model/ (an adapter directory, loaded through peft), so greedy outputs are equal."""
    run = tmp_path / "run"
    run_task(compose_config([*QUICK, "peft=lora", "train.checkpointing_enabled=true", "train.save_steps=4",
                             f"output_dir={run}"]))
    [checkpoint] = sorted((run / "checkpoints").iterdir())
    text = ["generate.apply_chat_template=false", prompts_arg(PROMPTS)]
    from_checkpoint = run_generate(checkpoint, tmp_path / "a", *text)
    assert from_checkpoint == run_generate(run / "final-model", tmp_path / "b", *text)
