"""Data formats (`data.format`): how one raw example becomes token ids and the mask of the tokens
the loss is computed on.

- `text`: a text column (`data.data_field`); with `data.separator`, the prompt through the
  separator is not trained on. BOS/EOS frame each row (`launcher.data.packing`), as in VectorLM.
- `chat`: a column of conversations (lists of `{role, content}` messages), rendered with the
  chat template; only the assistant turns are trained on: the template's `{% generation %}`
  blocks where it has them, else each turn through its end-of-turn token.
- `prompt_completion`: a prompt and a completion column; only the completion (and EOS) is
  trained on. Both columns may also hold conversations (TRL's conversational prompt-completion).
- `sharegpt`: a column (default `conversations`) of `{from, value}` messages, roles human, gpt,
  system, tool; trained on exactly as `chat` after mapping them to user, assistant, system, tool.
- `alpaca`: `instruction`, optional `input`, `output` columns; with a chat template one user turn
  (the instruction, a newline, the input: LLaMA-Factory's join) and the output as the assistant turn; without one,
  the standard Alpaca prompt (ALPACA_PROMPT) and the output (and EOS) trained on.

`framing` is the one place that says whether hydralm puts BOS and EOS around training text, and
around what: each row (text) or each example (prompt_completion's and alpaca's plain text, DPO text
pairs); a chat template places its own.

`render_conversation` is the one place a conversation becomes tokens: the chat format here and
task=dpo's chat preference pairs use it, so a conversation is trained on exactly as it is scored.
It depends only on a transformers tokenizer. Everything here is per example or per batch: the
pipeline (launcher/data/preprocessing.py) maps it over a dataset and packs the result.
"""

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from launcher.errors import ConfigError

FORMATS = ("text", "chat", "prompt_completion", "sharegpt", "alpaca")
# Formats whose examples are conversations rendered by the chat template.
CONVERSATIONAL = ("chat", "sharegpt")
# ShareGPT's `from` values (FastChat, axolotl, LLaMA-Factory) as roles; some exports already write
# user and assistant there.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "user": "user", "assistant": "assistant"}
ALPACA_COLUMNS = ("instruction", "output")  # and `input`, optional
# The Stanford Alpaca prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), used
# when the tokenizer has no chat template; the output follows it.
ALPACA_PROMPT = {
    "with_input": ("Below is an instruction that describes a task, paired with an input that provides further context. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "without_input": ("Below is an instruction that describes a task. "
                      "Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\n{instruction}\n\n### Response:\n"),
}
ROLES = ("system", "user", "assistant", "tool")

# The tokenizer's memory is ~160 bytes per character of one call (HF tokenizers keep offsets, words
# and token strings per token), so texts are fed in calls of at most CALL_CHARS characters, and a
# text longer than PIECE_CHARS is cut into pieces at single spaces between words, where the
# pre-tokenizer splits anyway (the ids are those of the whole text; tests/test_formats.py).
PIECE_CHARS = 100_000
CALL_CHARS = 1_000_000


class ChatTemplateError(ConfigError):
    """The chat template cannot locate the trained turns (its renderings are not prefix-stable)."""


# ---------------------------------------------------------------------- conversations


def conversation_problem(messages) -> Optional[str]:
    """Why `messages` is not a conversation to train on, as a short reason (None if it is one):
    a list of `{role, content}` messages, roles in ROLES, string contents, an assistant turn."""
    if messages is None or (isinstance(messages, (list, tuple)) and not messages):
        return "empty conversation"
    if not isinstance(messages, (list, tuple)):
        return "not a list of messages"
    for message in messages:
        if not isinstance(message, dict):
            return "not a list of messages"
        if message.get("role") not in ROLES:
            return "unknown role"
        if not isinstance(message.get("content"), str):
            return "content not a string"
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant turn"
    return None


def chat_template(tokenizer, template: Optional[str] = None) -> str:
    """`template` (a Jinja string or a template name of the tokenizer), else the tokenizer's own."""
    try:
        return tokenizer.get_chat_template(template)
    except ValueError:
        raise ConfigError("the tokenizer has no chat template; set data.chat_template to a Jinja template "
                         "or a .jinja file") from None


def conversation_spans(tokenizer, messages: list[dict], template: Optional[str] = None,
                       train_on: Optional[Iterable[int]] = None) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the character spans that are trained on.

    A template with `{% generation %}` blocks says itself what the assistant says: the spans are
    its blocks, exactly what transformers' `return_assistant_tokens_mask=True` (and so TRL's
    `assistant_only_loss`) trains. A template without them gets the append rule: a trained turn's
    span is what rendering it adds to the conversation before it with the generation prompt, the
    assistant's text as the template writes it through the template's end-of-turn token (the last
    special token it adds; for a template without special tokens, through its last non-whitespace
    character), so role headers, the generation prompt and what follows the end-of-turn token are
    never trained on, and the end-of-turn token always is.
    `train_on`: indices of the assistant messages to train on (default: all of them). Raises
    ChatTemplateError when a turn must be located and the template renders a prefix of the
    conversation differently from the start of the whole.
    """
    template = chat_template(tokenizer, template)
    everything = train_on is None
    if everything:
        train_on = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    train_on = sorted(train_on)
    if any(messages[i]["role"] != "assistant" for i in train_on):
        raise ValueError("only assistant messages can be trained on")
    if has_generation_marks(template):
        return _marked_spans(tokenizer, template, messages, None if everything else train_on)
    prompts = _render(tokenizer, template, [messages[:i] for i in train_on], generation_prompt=True)
    *turns, full = _render(tokenizer, template, [messages[:i + 1] for i in train_on] + [messages], False)
    spans = []
    for i, prompt, turn in zip(train_on, prompts, turns):
        if not (turn.startswith(prompt) and full.startswith(turn)):
            raise _not_prefix_stable(i)
        spans.append((len(prompt), len(prompt) + _through_end_of_turn(turn[len(prompt):], _special_tokens(tokenizer))))
    return full, spans


# transformers' own test for a template with generation blocks (chat_template_utils.render_jinja_template).
_GENERATION_MARK = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


def has_generation_marks(template: str) -> bool:
    """Whether the template marks what the assistant says with `{% generation %}` blocks."""
    return bool(_GENERATION_MARK.search(template))


def _marked_spans(tokenizer, template: str, messages: list[dict],
                  train_on: Optional[list[int]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendering and its `{% generation %}` blocks (transformers' renderer and character
    spans, so the same text and tokens as apply_chat_template); with `train_on`, only the blocks
    that the selected messages add (a turn's blocks are those of the conversation through it
    that the conversation before it does not have)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if train_on is None:
        conversations = [messages]
    else:
        conversations = [messages] + [messages[:j] for i in train_on for j in (i, i + 1)]
    texts, blocks = render_jinja_template(conversations=conversations, chat_template=template,
                                          return_assistant_tokens_mask=True, add_generation_prompt=False,
                                          **tokenizer.special_tokens_map)
    full, spans = texts[0], [tuple(span) for span in blocks[0]]
    if train_on is None:
        return full, spans
    selected = []
    for k, i in enumerate(train_on):
        before, through = 1 + 2 * k, 2 + 2 * k
        if not (texts[through].startswith(texts[before]) and full.startswith(texts[through])
                and blocks[through][:len(blocks[before])] == blocks[before]):
            raise _not_prefix_stable(i)
        selected += [tuple(span) for span in blocks[through][len(blocks[before]):]]
    return full, selected


def _not_prefix_stable(i: int) -> ChatTemplateError:
    return ChatTemplateError(
        f"the chat template renders message {i} (assistant) so that the conversation up to it is not "
        "the start of the whole conversation; hydralm locates the assistant tokens to train on as what each "
        "assistant turn appends, so it needs a template whose turns append (set data.chat_template)")


def _through_end_of_turn(text: str, special_tokens: tuple[str, ...]) -> int:
    """Length of `text` through its last special token, or through its last non-whitespace."""
    ends = [text.rfind(token) + len(token) for token in special_tokens if token in text]
    return max(ends) if ends else len(text.rstrip())


@lru_cache(maxsize=8)
def _special_tokens(tokenizer) -> tuple[str, ...]:
    return tuple(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)


def _render(tokenizer, template: str, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
    if not conversations:
        return []
    # A list of conversations is rendered as a batch (an empty one is allowed there).
    return tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_conversation(tokenizer, messages: list[dict], template: Optional[str] = None,
                        train_on: Optional[Iterable[int]] = None) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` rendered with the chat template (`template`, a Jinja string, or the
    tokenizer's), and per token whether it is trained on: the tokens of every assistant turn (or
    of the assistant messages in `train_on`): the template's `{% generation %}` blocks where it
    has them, else each turn through its end-of-turn token; nothing else.

    The text is tokenized whole (add_special_tokens=False: the template places BOS), and a token
    is trained on when its characters overlap a trained span (`conversation_spans`): the rule of
    transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)`, so for a marked
    template the same mask, and for any other the append rule's. Needs a fast tokenizer.
    Raises ChatTemplateError for templates that are not prefix-stable, and jinja2's
    TemplateError for conversations the template refuses.
    """
    text, spans = conversation_spans(tokenizer, messages, template, train_on)
    ids, offsets = encode(tokenizer, [text], with_offsets=True)[0]
    return ids.tolist(), trained_mask(offsets, spans).tolist()


def trained_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Per token (character offsets `[start, end)`), whether it overlaps any span."""
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask


# ---------------------------------------------------------------------- tokenizing


def encode(tokenizer, texts: list[str], with_offsets: bool = False) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
    """(ids int32, character offsets (n, 2) or None) of each text, without special tokens, with
    memory bounded by CALL_CHARS whatever the texts' lengths."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        if with_offsets:
            raise ConfigError("data.format=chat needs a fast tokenizer (character offsets)")
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [(np.asarray(i, dtype=np.int32), None) for i in ids]
    split = _splits_at_spaces(tokenizer)
    pieces = [(i, start, end) for i, text in enumerate(texts)
              for start, end in (_pieces(text) if split else [(0, len(text))])]
    ids = [[] for _ in texts]
    offsets = [[] for _ in texts]
    for call in _calls(pieces):
        strings = [texts[i][start:end] for i, start, end in call]
        if with_offsets:
            encodings = backend.encode_batch(strings, add_special_tokens=False)
        else:
            encodings = backend.encode_batch_fast(strings, add_special_tokens=False)
        for (i, start, _), encoding in zip(call, encodings):
            ids[i].append(np.array(encoding.ids, dtype=np.int32))
            if with_offsets:
                offsets[i].append(np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2) + start)
    return [(_join(ids[i], np.int32), _join(offsets[i], np.int64, (0, 2)) if with_offsets else None)
            for i in range(len(texts))]


def _join(parts: list[np.ndarray], dtype, empty_shape=(0,)) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=dtype)


def _calls(pieces: list[tuple[int, int, int]]):
    """Groups of pieces of at most CALL_CHARS characters (a piece is at most PIECE_CHARS)."""
    call, size = [], 0
    for piece in pieces:
        length = piece[2] - piece[1]
        if call and size + length > CALL_CHARS:
            yield call
            call, size = [], 0
        call.append(piece)
        size += length
    if call:
        yield call


def _pieces(text: str) -> list[tuple[int, int]]:
    """[start, end) pieces of at most PIECE_CHARS characters, cut before a single space between
    two words (or hard, in a run of PIECE_CHARS characters without one)."""
    bounds, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind(" ", start + 1, start + PIECE_CHARS)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + PIECE_CHARS
        bounds.append((start, cut))
        start = cut
    bounds.append((start, len(text)))
    return bounds


_SPLIT_PROBES = [("Hello, world.", " This is a test"), ("x = f(1);", " y += 2"), ("naïve café", " déjà vu"),
                 ("数据集", " 测试"), ("end.\n\nNext", " line"), ("42", " 17")]


@lru_cache(maxsize=8)
def _splits_at_spaces(tokenizer) -> bool:
    """Whether cutting a text before a space between words leaves its ids unchanged (true for
    byte-level BPE, tiktoken-style and Metaspace pre-tokenizers). Otherwise long texts are
    tokenized whole."""
    backend = tokenizer.backend_tokenizer
    for head, tail in _SPLIT_PROBES:
        whole = backend.encode(head + tail, add_special_tokens=False).ids
        if whole != backend.encode(head, add_special_tokens=False).ids + backend.encode(tail, add_special_tokens=False).ids:
            return False
    return True


# ---------------------------------------------------------------------- formats


@dataclass
class Encoded:
    """A batch of examples as documents: per example its ids, its trained mask (None: every token)
    and why it was dropped ("" when kept; a dropped example has no ids)."""

    ids: list[np.ndarray]
    trained: list[Optional[np.ndarray]]
    dropped: list[str]

    @classmethod
    def empty(cls, n: int) -> "Encoded":
        return cls([np.zeros(0, np.int32)] * n, [None] * n, [""] * n)

    def drop(self, i: int, reason: str) -> None:
        self.ids[i], self.trained[i], self.dropped[i] = np.zeros(0, np.int32), None, reason


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """`data.chat_template`: None, a Jinja string, or the path of a file holding one."""
    if value is None or "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.chat_template={value} is neither a file nor a Jinja template")
    return path.read_text()


class Encoder:
    """Turns a batch of raw examples (columns as Python lists) into `Encoded` documents."""

    def __init__(self, tokenizer, data, columns: tuple[str, ...]):
        self.tokenizer, self.data, self.columns = tokenizer, data, columns
        self._template = None

    def __call__(self, columns: dict[str, list], indices: list[int]) -> Encoded:
        raise NotImplementedError

    @property
    def template(self) -> str:
        """The chat template (data.chat_template, else the tokenizer's), loaded when first needed."""
        if self._template is None:
            self._template = chat_template(self.tokenizer, load_chat_template(self.data.chat_template))
        return self._template

    def render(self, out: Encoded, conversations: dict[int, tuple[list, Optional[list[int]]]], indices: list[int]) -> None:
        """Fills `out` at each i of {i: (messages, train_on)} with the rendered conversation, or
        drops it when the template refuses it (its raise_exception: roles that do not alternate...)."""
        from jinja2 import TemplateError

        rendered = {}
        for i, (messages, train_on) in conversations.items():
            try:
                rendered[i] = conversation_spans(self.tokenizer, messages, self.template, train_on)
            except ChatTemplateError as err:
                raise ChatTemplateError(f"row {indices[i]}: {err}") from None
            except TemplateError:
                out.drop(i, "refused by the chat template")
        keys = list(rendered)
        for i, (ids, offsets) in zip(keys, encode(self.tokenizer, [rendered[i][0] for i in keys], with_offsets=True)):
            out.ids[i], out.trained[i] = ids, trained_mask(offsets, rendered[i][1])


class TextEncoder(Encoder):
    """`text`: `pre_pend` + the text. With a separator, the prompt (through the separator) and
    the answer are tokenized apart, so the label mask falls exactly on the separator."""

    def __init__(self, tokenizer, data):
        super().__init__(tokenizer, data, (data.data_field,))

    def __call__(self, columns, indices):
        texts = columns[self.data.data_field]
        out = Encoded.empty(len(texts))
        kept = [i for i, text in enumerate(texts) if text]
        for i in set(range(len(texts))) - set(kept):
            out.drop(i, "missing or empty text")
        pre_pend, separator = self.data.pre_pend or "", self.data.separator
        texts = [pre_pend + texts[i] for i in kept]
        if separator is None:
            for i, (ids, _) in zip(kept, encode(self.tokenizer, texts)):
                out.ids[i] = ids
            return out
        parts = [text.partition(separator) for text in texts]
        prompts = encode(self.tokenizer, [prompt + sep for prompt, sep, _ in parts])
        answers = encode(self.tokenizer, [answer for _, _, answer in parts])
        for i, (_, sep, _), (prompt, _), (answer, _) in zip(kept, parts, prompts, answers):
            if not sep:
                out.drop(i, "no separator")
                continue
            out.ids[i] = np.concatenate([prompt, answer])
            out.trained[i] = np.arange(len(out.ids[i])) >= len(prompt)
        return out


class ChatEncoder(Encoder):
    """`chat`: each conversation rendered by `render_conversation`'s rule; malformed ones
    (`conversation_problem`) and ones the template refuses are dropped with their reason."""

    def __init__(self, tokenizer, data):
        super().__init__(tokenizer, data, (data.data_field,))

    def __call__(self, columns, indices):
        conversations = columns[self.data.data_field]
        out = Encoded.empty(len(conversations))
        valid = {}
        for i, messages in enumerate(conversations):
            problem = conversation_problem(messages)
            if problem:
                out.drop(i, problem)
            else:
                valid[i] = (messages, None)
        self.render(out, valid, indices)
        return out


class PromptCompletionEncoder(Encoder):
    """`prompt_completion`: [BOS] prompt, then completion [EOS] trained on (BOS/EOS with
    data.add_bos_eos_tokens, the default). When the columns hold conversations, prompt +
    completion is one conversation and the completion's assistant turns are trained on."""

    def __init__(self, tokenizer, data):
        super().__init__(tokenizer, data, (data.prompt_field, data.completion_field))
        self.framing = framing(tokenizer, data)

    def __call__(self, columns, indices):
        prompts, completions = columns[self.data.prompt_field], columns[self.data.completion_field]
        out = Encoded.empty(len(prompts))
        texts, conversations = {}, {}
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if isinstance(prompt, list) and isinstance(completion, list):
                problem = conversation_problem(prompt + completion) or conversation_problem(completion)
                if problem:
                    out.drop(i, problem)
                else:
                    trained = [len(prompt) + j for j, m in enumerate(completion) if m["role"] == "assistant"]
                    conversations[i] = (prompt + completion, trained)
            elif prompt is None:
                out.drop(i, "missing prompt")
            elif not isinstance(prompt, str) or not isinstance(completion, str):
                out.drop(i, "prompt and completion not both text or both conversations")
            elif not completion:
                out.drop(i, "empty completion")
            else:
                texts[i] = (prompt, completion)
        self._texts(out, texts)
        self.render(out, conversations, indices)
        return out

    def _texts(self, out: Encoded, texts: dict[int, tuple[str, str]]) -> None:
        keys = list(texts)
        pre_pend = self.data.pre_pend or ""
        prompts = encode(self.tokenizer, [pre_pend + texts[i][0] for i in keys])
        answers = encode(self.tokenizer, [texts[i][1] for i in keys])
        bos, eos = (np.asarray([token], np.int32) for token in self.framing.ids) if self.framing else (np.zeros(0, np.int32),) * 2
        for i, (prompt, _), (answer, _) in zip(keys, prompts, answers):
            prompt = np.concatenate([bos, prompt])
            out.ids[i] = np.concatenate([prompt, answer, eos])
            out.trained[i] = np.arange(len(out.ids[i])) >= len(prompt)


class ShareGPTEncoder(ChatEncoder):
    """`sharegpt`: `{from, value}` messages mapped to `{role, content}` (SHAREGPT_ROLES), then `chat`."""

    def __call__(self, columns, indices):
        field = self.data.data_field
        return super().__call__({field: [sharegpt_messages(c) for c in columns[field]]}, indices)


def sharegpt_messages(conversation):
    """A ShareGPT conversation as `{role, content}` messages (an unknown `from` stays, so that
    `conversation_problem` names it)."""
    if not isinstance(conversation, (list, tuple)):
        return conversation
    return [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
            if isinstance(m, dict) else m for m in conversation]


class AlpacaEncoder(PromptCompletionEncoder):
    """`alpaca`: through the chat template when there is one (data.chat_template or the
    tokenizer's): the instruction and input as one user turn, the output as the assistant's;
    else the standard Alpaca prompt (ALPACA_PROMPT), then the output and EOS trained on."""

    def __init__(self, tokenizer, data):
        Encoder.__init__(self, tokenizer, data, ALPACA_COLUMNS + ("input",))  # (input is optional)
        try:
            self._template = chat_template(tokenizer, load_chat_template(data.chat_template))
        except ConfigError:  # no template: the Alpaca prompt
            self._template = None
        self.framing = framing(tokenizer, data, templated=self.chat)

    @property
    def chat(self) -> bool:
        return self._template is not None

    def __call__(self, columns, indices):
        inputs = columns.get("input") or [None] * len(columns["instruction"])
        out = Encoded.empty(len(inputs))
        texts, conversations = {}, {}
        for i, (instruction, given, output) in enumerate(zip(columns["instruction"], inputs, columns["output"])):
            if not instruction or not output:
                out.drop(i, "missing instruction or output")
            elif self.chat:
                user = instruction + "\n" + given if given else instruction  # LLaMA-Factory's join
                conversations[i] = ([{"role": "user", "content": user}, {"role": "assistant", "content": output}], None)
            else:
                prompt = ALPACA_PROMPT["with_input" if given else "without_input"]
                texts[i] = (prompt.format(instruction=instruction, input=given), output)
        self._texts(out, texts)
        self.render(out, conversations, indices)
        return out


ENCODERS = {"text": TextEncoder, "chat": ChatEncoder, "prompt_completion": PromptCompletionEncoder,
            "sharegpt": ShareGPTEncoder, "alpaca": AlpacaEncoder}


# A conversation every template must render (no system message: some templates, Gemma's, refuse one).
PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye."}]


def encoder(tokenizer, data) -> Encoder:
    """The encoder of `data.format` for this tokenizer; checks what needs the tokenizer (BOS/EOS,
    a chat template that renders a probe conversation prefix-stably) before any data is read."""
    resolve_defaults(data)
    chosen = ENCODERS[data.format](tokenizer, data)  # (prompt_completion checks BOS/EOS here)
    if data.format in CONVERSATIONAL or (data.format == "alpaca" and chosen.chat):
        # (prompt_completion needs a template only for conversations)
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ConfigError(f"data.format={data.format} needs a fast tokenizer (character offsets)")
        template = chosen.template
        try:
            conversation_spans(tokenizer, PROBE, template)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 (a template can fail in many ways)
            raise ConfigError(f"the chat template cannot render a plain conversation: {type(err).__name__}: {err}") from None
    return chosen


def resolve_defaults(data) -> None:
    """Fill in the keys whose default depends on data.format (idempotent): data_field (`text`,
    `messages` for chat, `conversations` for sharegpt) and add_bos_eos_tokens (false for chat
    and sharegpt)."""
    if data.data_field is None:
        data.data_field = {"chat": "messages", "sharegpt": "conversations"}.get(data.format, "text")
    if data.add_bos_eos_tokens is None:
        data.add_bos_eos_tokens = add_bos_eos(data)


# ---------------------------------------------------------------------- BOS/EOS framing


@dataclass(frozen=True)
class Framing:
    """The BOS and EOS ids hydralm puts around training text, and what they frame (`framing_place`)."""

    bos: int
    eos: int
    place: str  # "row" or "example"

    @property
    def ids(self) -> tuple[int, int]:
        return self.bos, self.eos


def framing_place(data, pairs: bool = False, templated: bool = False) -> Optional[str]:
    """What hydralm frames with BOS and EOS, from `data` alone (checks ask before the tokenizer
    is loaded): None when `add_bos_eos` is false or a chat template renders the examples
    (`templated`: it places its own special tokens); "row", every packed or truncated row, for
    the text format (as VectorLM); else "example": prompt_completion, alpaca's plain prompt and
    task=dpo's text `pairs`, whose prompt and response must stay inside one frame."""
    if templated or not add_bos_eos(data):
        return None
    return "row" if data.format == "text" and not pairs else "example"


def framing(tokenizer, data, pairs: bool = False, templated: bool = False) -> Optional[Framing]:
    """`framing_place` with the tokenizer's BOS and EOS ids; a tokenizer without one of them is
    an error naming the key."""
    place = framing_place(data, pairs, templated)
    if place is None:
        return None
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ConfigError(f"data.add_bos_eos_tokens=true but the tokenizer has no BOS or EOS token (bos_token_id="
                          f"{bos}, eos_token_id={eos}); set data.add_bos_eos_tokens=false")
    return Framing(bos, eos, place)


def starts_with_bos(tokenizer, ids: list[int]) -> bool:
    """Whether `ids` start with the tokenizer's BOS, whether hydralm's framing or a chat template
    put it there: cutting a prompt from its start keeps it."""
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def add_bos_eos(data) -> bool:
    """`data.add_bos_eos_tokens`, where null means the format's default: true for text,
    prompt_completion and alpaca's plain prompt, false for chat and sharegpt (the chat template
    places its own special tokens)."""
    if data.add_bos_eos_tokens is None:
        return data.format not in CONVERSATIONAL
    return bool(data.add_bos_eos_tokens)


# ---------------------------------------------------------------------- columns


def column_problem(dataset, data) -> Optional[str]:
    """What is wrong with the columns `data.format` reads (None if nothing): missing, of the
    wrong kind, or not UTF-8. Runs on the loaded dataset before tokenizing."""
    if data.format == "alpaca":
        return _alpaca_column_problem(dataset)
    keys = {"text": ("data_field",), "chat": ("data_field",), "sharegpt": ("data_field",),
            "prompt_completion": ("prompt_field", "completion_field")}
    for key in keys[data.format]:
        column = data[key]
        if column not in dataset.column_names:
            chats = [c for c in dataset.column_names if _kind(dataset.features[c]) == "conversations"]
            hint = ""
            if chats and data.format == "text":
                hint = f"; {chats[0]} holds conversations: use data.format=chat"
            elif chats and data.format in CONVERSATIONAL:
                layout = _layout_of(dataset.features[chats[0]].feature) or data.format
                also = f"data.format={layout} " if layout != data.format else ""
                hint = f"; {chats[0]} holds conversations: set {also}data.data_field={chats[0]}"
            return f"data.{key}={column} is not a column of the dataset; columns: {', '.join(dataset.column_names)}{hint}"
        feature = dataset.features[column]
        kind = _kind(feature)
        wants_text = data.format == "text" or (data.format == "prompt_completion" and kind != "conversations")
        if wants_text and kind == "json":
            problem = _first_non_string(dataset, column, key)
            if problem:
                return problem
        elif wants_text and kind != "text":
            hint = "; use data.format=chat" if kind == "conversations" and data.format == "text" else ""
            return f"data.{key}={column} holds {_describe(feature)}, not text{hint}"
        elif not wants_text and kind not in ("conversations", "json"):
            return f"data.{key}={column} holds {_describe(feature)}, not conversations (lists of {{role, content}} messages)"
        elif data.format in CONVERSATIONAL and kind == "conversations":
            problem = _message_keys_problem(feature.feature, data.format, f"data.{key}={column}")
            if problem:
                return problem
        problem = _invalid_utf8(dataset, column)
        if problem:
            return problem
    return None


MESSAGE_KEYS = {"chat": ("role", "content"), "sharegpt": ("from", "value")}


def _layout_of(message) -> Optional[str]:
    """The conversational format whose message keys `message` (a feature or a dict) has."""
    if not isinstance(message, dict):
        return None
    return next((name for name, keys in MESSAGE_KEYS.items() if all(k in message for k in keys)), None)


def _message_keys_problem(message, format: str, where: str) -> Optional[str]:
    """Messages whose keys are another layout's (ShareGPT's from/value read as chat, or the reverse)."""
    if not isinstance(message, dict):
        return None
    wanted = MESSAGE_KEYS[format]
    if all(k in message for k in wanted):
        return None
    other = _layout_of(message)
    hint = f"; use data.format={other}" if other else ""
    return (f"{where} holds messages with keys {', '.join(message)}, not data.format={format}'s "
            f"{', '.join(wanted)}{hint}")


def _alpaca_column_problem(dataset) -> Optional[str]:
    for column in ALPACA_COLUMNS + ("input",):
        if column not in dataset.column_names:
            if column == "input":
                continue
            return (f"data.format=alpaca reads the columns instruction, input (optional) and output; {column} is "
                    f"missing; columns: {', '.join(dataset.column_names)}")
        kind = _kind(dataset.features[column])
        problem = _first_non_string(dataset, column, "format=alpaca") if kind == "json" else None
        if problem:
            return problem
        if kind not in ("text", "json"):
            return f"data.format=alpaca: column {column} holds {_describe(dataset.features[column])}, not text"
        problem = _invalid_utf8(dataset, column)
        if problem:
            return problem
    return None


def _kind(feature) -> str:
    from datasets import Json, LargeList, List, Sequence, Value

    if isinstance(feature, Value):
        return "text" if feature.dtype in ("string", "large_string") else "values"
    if isinstance(feature, Json):
        return "json"
    if isinstance(feature, (List, LargeList, Sequence)):
        return "conversations" if isinstance(feature.feature, (dict, Json)) else "values"
    return "values"


def _describe(feature) -> str:
    from datasets import Value

    kind = _kind(feature)
    if kind == "conversations":
        return "conversations (lists of messages)"
    if isinstance(feature, Value):
        return "strings" if kind == "text" else f"{feature.dtype} values"
    return f"{type(feature).__name__} values"


def _first_non_string(dataset, column: str, key: str) -> Optional[str]:
    """A JSON column of mixed types: the first row that is not a string."""
    for start in range(0, len(dataset), 10_000):
        values = dataset[start:start + 10_000][column]
        for offset, value in enumerate(values):
            if value is not None and not isinstance(value, str):
                return f"row {start + offset}: data.{key}={column} is {type(value).__name__} {value!r:.40}, not text"
    return None


def _invalid_utf8(dataset, column: str) -> Optional[str]:
    import pyarrow as pa

    chunks = dataset.data.column(column).chunks
    start = 0
    for chunk in chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for offset in range(len(chunk)):
                try:
                    chunk[offset].validate(full=True)
                    chunk[offset].as_py()
                except (pa.ArrowInvalid, UnicodeDecodeError):
                    return f"row {start + offset}: column {column} is not UTF-8 text"
            return f"column {column} is not UTF-8 text"
        start += len(chunk)
    return None
