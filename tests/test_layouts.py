"""The dataset layouts people have (data.format, docs/data.md "Layouts"): OpenAI messages, ShareGPT,
Alpaca, TRL's conversational and implicit-prompt preference pairs.

References are built here, independent of hydralm's renderer: transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` on conversations mapped by hand, and
the Stanford Alpaca prompt written out. The end-to-end tests train from a JSONL file as a user
types the command."""

import json

import pytest
from conftest import compose_config, run_launcher
from datasets import Dataset

from launcher.data import formats
from launcher.data.pairs import EncodePairs
from launcher.data.preprocessing import Tokenize, check_preprocessing, normalise_data
from launcher.errors import ConfigError
from launcher.model.modeling import load_tokenizer

IGNORE = -100
SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is a list?"},
            {"from": "gpt", "value": "A mutable sequence."}, {"from": "human", "value": "Call len."},
            {"from": "tool", "value": "3"}, {"from": "gpt", "value": "It has 3 items."}]
# ShareGPT's roles as OpenAI's, by hand.
AS_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
               {"role": "assistant", "content": "A mutable sequence."}, {"role": "user", "content": "Call len."},
               {"role": "tool", "content": "3"}, {"role": "assistant", "content": "It has 3 items."}]
ALPACA = [{"instruction": "Name a prime.", "input": "", "output": "Seven."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
# The Stanford Alpaca prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), written out.
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
ALPACA_WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nName a prime.\n\n### Response:\n")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config().model)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The tiny tokenizer without a chat template."""
    plain = load_tokenizer(compose_config().model)
    plain.chat_template = None
    return plain


def reference(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], [bool(m) for m in out["assistant_masks"]]


def tokenized(tokenizer, fmt, rows):
    data = compose_config([f"data.format={fmt}"]).data
    normalise_data(data)
    check_preprocessing(data, 512)
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    table = Tokenize(tokenizer, data)(columns, list(range(len(rows))))
    return list(zip(table.column("input_ids").to_pylist(), table.column("trained").to_pylist()))


def test_sharegpt_trains_as_the_same_conversation_in_openai_roles(tokenizer):
    assert tokenized(tokenizer, "sharegpt", [{"conversations": SHAREGPT}]) == [reference(tokenizer, AS_MESSAGES)]
    assert tokenized(tokenizer, "chat", [{"messages": AS_MESSAGES}]) == [reference(tokenizer, AS_MESSAGES)]
    unknown = [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]
    data = compose_config(["data.format=sharegpt"]).data
    normalise_data(data)
    check_preprocessing(data, 512)
    assert Tokenize(tokenizer, data)({"conversations": [unknown]}, [0]).column("dropped").to_pylist() == ["unknown role"]


def test_alpaca_goes_through_the_chat_template_when_there_is_one(tokenizer):
    conversations = [[{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
                     [{"role": "user", "content": "Add the numbers.\n2 and 3"}, {"role": "assistant", "content": "5"}]]
    assert tokenized(tokenizer, "alpaca", ALPACA) == [reference(tokenizer, c) for c in conversations]


def test_alpaca_without_a_chat_template_is_the_alpaca_prompt_then_the_output(plain_tokenizer):
    def encode(text):
        return plain_tokenizer(text, add_special_tokens=False)["input_ids"]

    expected = []
    for prompt, output in ((ALPACA_WITHOUT_INPUT, "Seven."), (ALPACA_WITH_INPUT, "5")):
        head, tail = [plain_tokenizer.bos_token_id] + encode(prompt), encode(output) + [plain_tokenizer.eos_token_id]
        expected.append((head + tail, [False] * len(head) + [True] * len(tail)))
    assert tokenized(plain_tokenizer, "alpaca", ALPACA) == expected


@pytest.mark.parametrize("fmt,rows,message", [
    ("alpaca", [{"instruction": "a", "input": "b"}], "data.format=alpaca reads the columns instruction, input "
                                                      "(optional) and output; output is missing; columns: instruction, input"),
    ("sharegpt", [{"messages": AS_MESSAGES}], "data.data_field=conversations is not a column of the dataset; columns: "
                                              "messages; messages holds conversations: set data.format=chat"),
    ("chat", [{"messages": SHAREGPT}], "data.data_field=messages holds messages with keys from, value, not "
                                       "data.format=chat's role, content; use data.format=sharegpt"),
    ("sharegpt", [{"conversations": AS_MESSAGES}], "use data.format=chat"),
])
def test_a_missing_column_or_another_layout_is_one_line_naming_it(fmt, rows, message):
    data = compose_config([f"data.format={fmt}"]).data
    formats.resolve_defaults(data)
    problem = formats.column_problem(Dataset.from_list(rows), data)
    assert message in problem and "\n" not in problem


def test_a_misspelt_layout_names_the_valid_ones():
    with pytest.raises(ConfigError, match="data.format='sharegtp' is not valid; choose one of: text, chat, "
                                          "prompt_completion, sharegpt, alpaca; did you mean sharegpt"):
        check_preprocessing(compose_config(["data.format=sharegtp"]).data, 512)


# ---------------------------------------------------------------------- preference pairs (task=dpo)

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."}]
CHOSEN, REJECTED = [{"role": "assistant", "content": "Seven."}], [{"role": "assistant", "content": "Nine, I think."}]


def pair_reference(tokenizer, prompt, response):
    """transformers' mask of the whole conversation, less every token of the prompt's rendering."""
    ids, mask = reference(tokenizer, prompt + response)
    before = len(tokenizer.apply_chat_template(prompt, return_dict=True)["input_ids"])
    return ids, [IGNORE if k < before or not m else t for k, (t, m) in enumerate(zip(ids, mask))]


def encoded_pairs(tokenizer, batch):
    cfg = compose_config(["task=dpo", "data=files", "data.load_path=unused", "data.format=chat"])
    out = EncodePairs(tokenizer, cfg)(batch)
    return [[(out[f"{side}_input_ids"][i], out[f"{side}_labels"][i]) for side in ("chosen", "rejected")]
            for i in range(len(out["chosen_input_ids"]))]


def test_conversational_preference_pairs_train_the_responses(tokenizer):
    expected = [pair_reference(tokenizer, PROMPT, response) for response in (CHOSEN, REJECTED)]
    assert encoded_pairs(tokenizer, {"prompt": [PROMPT], "chosen": [CHOSEN], "rejected": [REJECTED]}) == [expected]


def test_implicit_prompt_pairs_take_the_shared_messages_as_the_prompt(tokenizer):
    expected = [pair_reference(tokenizer, PROMPT, response) for response in (CHOSEN, REJECTED)]
    assert encoded_pairs(tokenizer, {"chosen": [PROMPT + CHOSEN], "rejected": [PROMPT + REJECTED]}) == [expected]
    # Nothing shared: not a pair (dropped and counted as malformed).
    assert encoded_pairs(tokenizer, {"chosen": [CHOSEN], "rejected": [REJECTED]}) == [[([], []), ([], [])]]


# ---------------------------------------------------------------------- end to end, from a file

ROWS = 20


def _rows(layout):
    for k in range(ROWS):
        question, answer = f"What is {k} plus {k}?", f"It is {2 * k}."
        if layout == "messages":
            yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        elif layout == "sharegpt":
            yield {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": question},
                                     {"from": "gpt", "value": answer}]}
        elif layout == "alpaca":
            yield {"instruction": "Add the numbers.", "input": f"{k} and {k}" if k % 2 else "", "output": answer}
        elif layout == "pairs":
            yield {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": answer}],
                   "rejected": [{"role": "assistant", "content": "I do not know."}]}
        elif layout == "implicit_pairs":
            asked = [{"role": "user", "content": question}]
            yield {"chosen": asked + [{"role": "assistant", "content": answer}],
                   "rejected": asked + [{"role": "assistant", "content": "I do not know."}]}


@pytest.mark.slow
@pytest.mark.parametrize("layout,args", [
    ("messages", ["data.format=chat"]),
    ("sharegpt", ["data.format=sharegpt"]),
    ("alpaca", ["data.format=alpaca"]),
    ("pairs", ["task=dpo", "data.format=chat"]),
    ("implicit_pairs", ["task=dpo", "data.format=chat"]),
])
def test_each_layout_trains_from_a_file(tmp_path, layout, args):
    path = tmp_path / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(layout)))
    out = tmp_path / "out"
    result = run_launcher(["data=files", f"data.load_path={path}", *args, "train.max_steps=2",
                           f"output_dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("step") == 2 for row in steps)
    assert (out / "final-model" / "model.safetensors").exists()
