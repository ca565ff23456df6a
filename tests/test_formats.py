"""Data formats (launcher/data/formats.py): chat conversations and prompt/completion pairs become the
right tokens with exactly the right tokens trained on, in every packing mode.

References are independent of hydralm: transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` on templates with `{% generation %}` blocks (the committed
tiny template has them), and the tokenizer's own ids for each assistant content."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, compose_config, pack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.data import formats
from launcher.data.packing import PackingSpec
from launcher.data.preprocessing import Tokenize, documents_of
from launcher.model.modeling import load_tokenizer

IGNORE = -100
CHATML = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    r"{%- if message['role'] == 'assistant' -%}"
    r"{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    r"{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
    r"{{- '\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Templates for the `{% generation %}` rule (launcher.data.formats.conversation_spans).
# Role header outside the block and no generation-prompt branch: the append rule would train the header.
HEADER_OUTSIDE = CHATML[:CHATML.index(r"{%- if add_generation_prompt")]
# The block also covers the newline after the end-of-turn token (TRL's Qwen 2.5 / Gemma training templates).
WHITESPACE_IN_BLOCK = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    r"{%- if message['role'] == 'assistant' -%}"
    r"{%- generation -%}{{- message['content'] + '<|im_end|>\n' -}}{%- endgeneration -%}"
    r"{%- else -%}{{- message['content'] + '<|im_end|>\n' -}}{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
MARKED = {"chatml": CHATML, "header_outside": HEADER_OUTSIDE, "whitespace_in_block": WHITESPACE_IN_BLOCK}


def unmarked(template):
    """The template without its {% generation %} marks (the same text)."""
    return template.replace(r"{%- generation -%}", "").replace(r"{%- endgeneration -%}", "")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config().model)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    tokenizer = load_tokenizer(compose_config().model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ019 .,:;'\"()[]{}-_\n\té数")), max_size=40)
ROLE = st.sampled_from(["system", "user", "assistant", "tool"])


@st.composite
def conversations(draw, min_turns=1, max_turns=6):
    roles = draw(st.lists(ROLE, min_size=min_turns, max_size=max_turns))
    roles[draw(st.integers(0, len(roles) - 1))] = "assistant"  # at least one assistant turn
    return [{"role": role, "content": draw(TEXT)} for role in roles]


def reference(tokenizer, messages, template=None):
    """transformers' ids and assistant mask (the template's {% generation %} blocks)."""
    out = tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return out["input_ids"], [bool(m) for m in out["assistant_masks"]]


def content_tokens(tokenizer, messages):
    """What the tiny template trains on: each assistant content (trimmed) and its EOS."""
    ids = []
    for message in messages:
        if message["role"] == "assistant":
            ids += tokenizer(message["content"].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_a_rendered_conversation_trains_on_assistant_turns_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A mutable sequence."}, {"role": "user", "content": "And a tuple?"},
                {"role": "assistant", "content": "An immutable one."}]
    ids, trained = formats.render_conversation(tokenizer, messages)
    text = "<s>system:\nBe brief.\n\nuser:\nWhat is a list?\n\nassistant:\nA mutable sequence.</s>\n\n" \
           "user:\nAnd a tuple?\n\nassistant:\nAn immutable one.</s>\n\n"
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for t, m in zip(ids, trained) if m] == content_tokens(tokenizer, messages)
    assert tokenizer.decode([t for t, m in zip(ids, trained) if m]) == "A mutable sequence.</s>An immutable one.</s>"
    assert ids[0] == tokenizer.bos_token_id and not trained[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations())
def test_trained_tokens_are_the_assistant_contents_and_their_eos_and_agree_with_transformers(tokenizer, messages):
    ids, trained = formats.render_conversation(tokenizer, messages)
    assert (ids, trained) == reference(tokenizer, messages)
    assert [t for t, m in zip(ids, trained) if m] == content_tokens(tokenizer, messages)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations())
def test_agrees_with_transformers_on_a_chatml_template_without_trimming(chatml_tokenizer, messages):
    """An end-of-turn special token that is not EOS, followed by a newline; untrimmed contents
    (tokens may straddle a header and a content): the same tokens as transformers' mask."""
    ids, trained = formats.render_conversation(chatml_tokenizer, messages, CHATML)
    assert (ids, trained) == reference(chatml_tokenizer, messages, CHATML)
    end_of_turn = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, m in zip(ids, trained) if m and t == end_of_turn) == sum(m["role"] == "assistant" for m in messages)


def test_train_on_selects_assistant_messages(tokenizer):
    """What task=dpo needs: only the response after a prompt that has its own assistant turn."""
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
    ids, trained = formats.render_conversation(tokenizer, messages, train_on=[3])
    assert tokenizer.decode([t for t, m in zip(ids, trained) if m]) == "Seven.</s>"
    with pytest.raises(ValueError, match="only assistant messages"):
        formats.render_conversation(tokenizer, messages, train_on=[2])


def test_a_template_that_is_not_prefix_stable_is_an_error_naming_the_row(tokenizer):
    last_is_special = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}"
                       "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(formats.ChatTemplateError, match="is not the start of the whole conversation"):
        formats.render_conversation(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                {"role": "user", "content": "c"}], last_is_special)
    data = compose_config(["data=pydoc_chat", f"data.chat_template={json.dumps(last_is_special)}"]).data
    with pytest.raises(formats.ChatTemplateError, match="is not the start"):
        formats.encoder(tokenizer, data)  # found on a probe conversation, before any data is read


@pytest.mark.parametrize("messages,reason", [
    ([], "empty conversation"),
    (None, "empty conversation"),
    ("hello", "not a list of messages"),
    ([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}], "content not a string"),
    ([{"role": "user", "content": "x"}], "no assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], None),
])
def test_malformed_conversations_have_a_reason(messages, reason):
    assert formats.conversation_problem(messages) == reason


def _tokenize(tokenizer, overrides, columns):
    data = compose_config(overrides).data
    formats.resolve_defaults(data)
    n = len(next(iter(columns.values())))
    table = Tokenize(tokenizer, data)(columns, list(range(n)))
    return table


def _reassemble(rows: list[dict], spec: PackingSpec, n_docs: int):
    """Undo packing: per document (none, truncate, partial) or the whole stream (full), the
    (ids, labels) the rows carry, each token once."""
    if spec.mode in ("none", "truncate"):
        return [(r["input_ids"], r["labels"]) for r in rows]
    groups = [rows] if spec.mode == "full" else [[r for r in rows if r["id"] == d] for d in range(n_docs)]
    streams = []
    for group in groups:
        ids, labels = [], []
        for k, row in enumerate(group):
            skip = spec.overlap if k else 0
            ids += row["input_ids"][skip:]
            labels += row["labels"][skip:]
        streams.append((ids, labels))
    return streams


def _expected(docs, spec: PackingSpec):
    labelled = [(ids, [t if m else IGNORE for t, m in zip(ids, mask)]) for ids, mask in docs]
    if spec.mode == "truncate":
        return [(ids[:spec.max_seq_len], labels[:spec.max_seq_len]) for ids, labels in labelled]
    if spec.mode == "full":
        return [([t for ids, _ in labelled for t in ids], [t for _, labels in labelled for t in labels])]
    return labelled


MODES = st.sampled_from([("none", 0), ("truncate", 0), ("partial", 0), ("partial", 3), ("full", 0), ("full", 5)])


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(conversations(), min_size=1, max_size=4), mode=MODES, max_seq_len=st.integers(12, 40))
def test_chat_rows_train_exactly_the_assistant_tokens_in_every_packing_mode(tokenizer, batch, mode, max_seq_len):
    table = _tokenize(tokenizer, ["data=pydoc_chat"], {"messages": batch})
    spec = PackingSpec(mode[0], max_seq_len, overlap=mode[1], ignore_index=IGNORE)
    rows = pack(documents_of(table.to_batches()[0]), spec).to_pylist()
    docs = [reference(tokenizer, messages) for messages in batch]
    assert _reassemble(rows, spec, len(batch)) == _expected(docs, spec)
    if spec.mode == "full" and not spec.overlap:  # document_mask: positions restart at every conversation
        in_doc = [p for ids, _ in docs for p in range(len(ids))]
        starts = [sum(len(r["input_ids"]) for r in rows[:k]) for k in range(len(rows))]
        assert [p for row in rows for p in row["position_ids"]] == [
            min(in_doc[start + j], j) for row, start in zip(rows, starts) for j in range(len(row["input_ids"]))]
    if spec.mode in ("none", "partial", "full") and not spec.overlap:  # each token once: the property itself
        trained = [t for row in rows for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
        assert trained == [t for messages in batch for t in content_tokens(tokenizer, messages)]
    assert all(len(row["input_ids"]) <= max_seq_len for row in rows) or spec.mode == "none"


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(TEXT, TEXT.filter(bool)), min_size=1, max_size=4), mode=MODES,
       max_seq_len=st.integers(12, 40))
def test_prompt_completion_rows_train_the_completion_and_eos_in_every_packing_mode(tokenizer, pairs, mode, max_seq_len):
    table = _tokenize(tokenizer, ["data.format=prompt_completion"],
                      {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    spec = PackingSpec(mode[0], max_seq_len, overlap=mode[1], ignore_index=IGNORE)
    rows = pack(documents_of(table.to_batches()[0]), spec).to_pylist()

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    docs = []
    for prompt, completion in pairs:
        head, tail = [tokenizer.bos_token_id] + encode(prompt), encode(completion) + [tokenizer.eos_token_id]
        docs.append((head + tail, [False] * len(head) + [True] * len(tail)))
    assert _reassemble(rows, spec, len(pairs)) == _expected(docs, spec)


def test_conversational_prompt_completion_trains_only_the_completion(tokenizer):
    prompt = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "A prime?"}]
    completion = [{"role": "assistant", "content": "Seven."}]
    table = _tokenize(tokenizer, ["data.format=prompt_completion"], {"prompt": [prompt], "completion": [completion]})
    ids, trained = table.column("input_ids").to_pylist()[0], table.column("trained").to_pylist()[0]
    assert (ids, trained) == formats.render_conversation(tokenizer, prompt + completion, train_on=[3])
    assert tokenizer.decode([t for t, m in zip(ids, trained) if m]) == "Seven.</s>"


@pytest.mark.parametrize("format, setting, pairs, templated, place", [
    ("text", None, False, False, "row"), ("text", False, False, False, None),
    ("text", None, True, False, "example"), ("prompt_completion", None, False, False, "example"),
    ("alpaca", None, False, False, "example"), ("alpaca", None, False, True, None),
    ("chat", None, False, False, None), ("sharegpt", None, False, False, None), ("chat", None, True, True, None),
])
def test_framing_places_bos_and_eos_around_rows_for_text_and_around_examples_otherwise(
        tokenizer, format, setting, pairs, templated, place):
    data = SimpleNamespace(format=format, add_bos_eos_tokens=setting)
    assert formats.framing_place(data, pairs, templated) == place
    expected = formats.Framing(tokenizer.bos_token_id, tokenizer.eos_token_id, place) if place else None
    assert formats.framing(tokenizer, data, pairs, templated) == expected


def test_a_leading_bos_is_recognised_only_for_a_tokenizer_with_one(tokenizer):
    bos = tokenizer.bos_token_id
    assert formats.starts_with_bos(tokenizer, [bos, 5]) and not formats.starts_with_bos(tokenizer, [5, bos])
    assert not formats.starts_with_bos(SimpleNamespace(bos_token_id=None), [bos, 5])


def test_long_texts_are_tokenized_in_pieces_with_the_same_ids(tokenizer, monkeypatch):
    words = [text for _, text in __import__("launcher.data.sources", fromlist=["x"]).pydoc_documents()[:30]]
    text = " ".join(words)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(formats, "PIECE_CHARS", 997)
    monkeypatch.setattr(formats, "CALL_CHARS", 5000)
    assert len(formats._pieces(text)) > 20
    (ids, offsets), = formats.encode(tokenizer, [text], with_offsets=True)
    assert ids.tolist() == whole
    assert offsets.tolist() == [list(o) for o in tokenizer(text, add_special_tokens=False,
                                                             return_offsets_mapping=True)["offset_mapping"]]


@pytest.mark.slow
def test_a_long_line_is_tokenized_in_bounded_memory(tmp_path):
    """HF tokenizers hold ~120 bytes per character of one call (a 24 MB line took 3.9 GB): a
    3 MB line must now cost a fraction of the ~350 MB it took in one call."""
    script = (
        "import resource, sys\n"
        "from transformers import AutoTokenizer\n"
        "from launcher.data import formats\n"
        "from launcher.data.sources import pydoc_documents\n"
        "from launcher.schema import ASSETS_DIR\n"
        "tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / 'tiny_bpe')\n"
        "text = ' '.join(t for _, t in pydoc_documents()) * 7\n"
        "text = text[:3_000_000]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "(ids, _), = formats.encode(tokenizer, [text])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1000, len(ids))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    growth_mb, tokens = map(int, result.stdout.split())
    assert tokens > 500_000 and growth_mb < 150, (growth_mb, tokens)


def test_format_keys_are_part_of_the_cache_key_and_a_template_file_by_its_content(tokenizer, tmp_path):
    from launcher.data.preprocessing import preprocess_settings
    from launcher.data.sources import source_of

    template = tmp_path / "template.jinja"
    template.write_text(formats.chat_template(tokenizer))
    cfg = compose_config(["data=pydoc_chat", f"data.chat_template={template}"])
    source = source_of(cfg.data)
    raw = source.splits()
    settings = preprocess_settings(cfg, tokenizer, source, raw, "rows")
    assert {"format", "data_field", "prompt_field", "completion_field", "mixture"} <= set(settings)
    assert settings["chat_template"] == template.read_text() and settings["format"] == "chat"
    template.write_text(template.read_text().replace("assistant:", "bot:"))
    assert preprocess_settings(cfg, tokenizer, source, raw, "rows") != settings


def test_a_tokenizer_without_a_chat_template_is_an_error_before_any_data_is_read(tmp_path):
    import shutil

    from launcher.data.preprocessing import prepared_splits
    from launcher.distributed import ONE_PROCESS
    from launcher.errors import ConfigError
    from launcher.schema import ASSETS_DIR

    plain = tmp_path / "tok"
    shutil.copytree(ASSETS_DIR / "tiny_bpe", plain)
    (plain / "chat_template.jinja").unlink()
    cfg = compose_config(["data=pydoc_chat", f"model.tokenizer={plain}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match="the tokenizer has no chat template; set data.chat_template"):
        prepared_splits(cfg, load_tokenizer(cfg.model), ONE_PROCESS)
    assert not (tmp_path / "cache").exists()


def test_conversations_a_template_refuses_are_dropped_with_the_reason(tokenizer):
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}"
                   "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} | {% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")
    data = compose_config(["data=pydoc_chat", f"data.chat_template={json.dumps(alternating)}"]).data
    encoded = formats.encoder(tokenizer, data)({"messages": [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
    ]}, [0, 1])
    assert encoded.dropped == ["", "refused by the chat template"]
    # " b" is one token that starts in the generation prompt "assistant: ": trained (it overlaps)
    assert tokenizer.decode(encoded.ids[0][encoded.trained[0]]) == " b</s>"


@pytest.mark.slow  # a full-length training run (minutes on 2 cores)
def test_pydoc_chat_learns(tmp_path):
    from launcher.cli.app import run_task

    summary = run_task(compose_config(["data=pydoc_chat", "train.max_seq_len=64", "train.max_steps=8",
                                       "train.logging_steps=8", "train.max_eval_batches=4", f"output_dir={tmp_path}"]))
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5


# ---------------------------------------------------------------------- {% generation %} marks


@pytest.mark.parametrize("name", list(MARKED))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_a_marked_template_trains_exactly_its_generation_blocks(chatml_tokenizer, name, messages):
    """Equal to transformers' assistant mask, wherever the template puts the header and whatever
    whitespace its blocks cover."""
    ids, trained = formats.render_conversation(chatml_tokenizer, messages, MARKED[name])
    assert (ids, trained) == reference(chatml_tokenizer, messages, MARKED[name])


def test_the_header_outside_the_block_is_not_trained_and_the_newline_inside_it_is(chatml_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    for template, said in ((HEADER_OUTSIDE, "Hello there<|im_end|>"), (WHITESPACE_IN_BLOCK, "Hello there<|im_end|>\n")):
        ids, trained = formats.render_conversation(chatml_tokenizer, messages, template)
        assert chatml_tokenizer.decode([t for t, m in zip(ids, trained) if m]) == said
    # Without its marks, the header-outside template trains the header too (the append rule: what the turn adds).
    ids, trained = formats.render_conversation(chatml_tokenizer, messages, unmarked(HEADER_OUTSIDE))
    assert chatml_tokenizer.decode([t for t, m in zip(ids, trained) if m]) == "<|im_start|>assistant\nHello there<|im_end|>"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations())
def test_a_template_without_marks_keeps_the_append_rule(chatml_tokenizer, messages):
    """Unchanged behaviour: through the end-of-turn token, not the newline after it; for ChatML
    that is what the marked twin's blocks cover, so transformers' mask of the twin is the reference."""
    ids, trained = formats.render_conversation(chatml_tokenizer, messages, unmarked(CHATML))
    assert (ids, trained) == reference(chatml_tokenizer, messages, CHATML)
    ids, trained = formats.render_conversation(chatml_tokenizer, messages, unmarked(WHITESPACE_IN_BLOCK))
    assert (ids, trained) == reference(chatml_tokenizer, messages, CHATML)  # the same text, the newline unmarked


@pytest.mark.parametrize("name", list(MARKED))
def test_train_on_selects_the_blocks_of_the_chosen_turns(chatml_tokenizer, name):
    """transformers' mask of the whole conversation, minus every token of the rendering before
    the chosen turn (what task=dpo and conversational prompt_completion train)."""
    template = MARKED[name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "Seven."}, {"role": "assistant", "content": " And 11."}]
    ids, mask = reference(chatml_tokenizer, messages, template)
    before = len(chatml_tokenizer.apply_chat_template(messages[:4], chat_template=template, return_dict=True)["input_ids"])
    assert formats.render_conversation(chatml_tokenizer, messages, template, train_on=[4, 5]) == (
        ids, [m and k >= before for k, m in enumerate(mask)])
    assert formats.render_conversation(chatml_tokenizer, messages, template, train_on=[2])[1] == [
        m and k < before for k, m in enumerate(mask)]


@pytest.mark.parametrize("name", list(MARKED))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(conversations(), min_size=1, max_size=4), mode=MODES, max_seq_len=st.integers(12, 40))
def test_marked_template_rows_train_the_blocks_in_every_packing_mode(chatml_tokenizer, name, batch, mode, max_seq_len):
    data = compose_config(["data=pydoc_chat"]).data
    data.chat_template = MARKED[name]
    formats.resolve_defaults(data)
    table = Tokenize(chatml_tokenizer, data)({"messages": batch}, list(range(len(batch))))
    spec = PackingSpec(mode[0], max_seq_len, overlap=mode[1], ignore_index=IGNORE)
    rows = pack(documents_of(table.to_batches()[0]), spec).to_pylist()
    docs = [reference(chatml_tokenizer, messages, MARKED[name]) for messages in batch]
    assert _reassemble(rows, spec, len(batch)) == _expected(docs, spec)
