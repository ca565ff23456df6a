"""Preference pairs (task=dpo): raw (prompt, chosen, rejected) rows become two token sequences
that share the prompt, preprocessed once and cached like language-modelling rows
(`launcher.data.preprocessing.cached_splits`, kind "pairs").

A side of a pair is (token ids, trained mask): the prompt is the untrained prefix, the response
the trained rest. Plain text (`data.format=text`) is framed here ([BOS] prompt response [EOS]);
with `data.format=chat` the prompt is a list of messages and each response an assistant turn
(a string, a message or a list of messages: TRL's conversational preference layout), rendered by
the chat template exactly as chat training data is (`launcher.data.formats.render_conversation`:
the response's assistant tokens are trained). Chat data without a prompt column is TRL's
implicit-prompt layout: `chosen` and `rejected` are whole conversations and the messages they
share from the start are the prompt (TRL's `extract_prompt`).
"""

import logging
import shutil
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, List, Value
from omegaconf import DictConfig

from launcher.data import formats
from launcher.data.preprocessing import cached_splits
from launcher.data.sources import source_of
from launcher.distributed import World
from launcher.errors import ConfigError

log = logging.getLogger("hydralm")

SIDES = ("chosen", "rejected")
PAIR_FORMATS = ("text", "chat")
ENCODED_FEATURES = Features({
    **{f"{side}_{column}": List(Value("int32")) for side in SIDES for column in ("input_ids", "labels")},
    "truncated": Value("bool"),
    "identical": Value("bool"),  # chosen == rejected after fitting: no preference to learn (counted, kept)
    "malformed": Value("bool"),  # a chat pair that is not a conversation (counted, then dropped)
})
Side = tuple[list[int], list[bool]]  # token ids, trained mask


def preference_splits(cfg: DictConfig, tokenizer, world: World) -> dict[str, Dataset]:
    """{"train", "eval"} pairs: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`,
    `rejected_labels` and `id` (unique over both splits: train 0..n-1, then eval)."""
    return cached_splits(cfg, tokenizer, world, source_of(cfg.data), "pairs", build_pairs)


def check_pair_format(data: DictConfig) -> None:
    """Before any work (task=dpo's checks): the formats a preference pair can have."""
    if data.format not in PAIR_FORMATS:
        raise ConfigError(f"data.format={data.format} does not apply to task=dpo: preference pairs are "
                          f"{' or '.join(PAIR_FORMATS)} (chat: TRL's conversational and implicit-prompt layouts)")


def max_prompt_len(cfg: DictConfig) -> int:
    return cfg.dpo.max_prompt_len or cfg.train.max_seq_len // 2


def build_pairs(cfg: DictConfig, tokenizer, raw: dict, out: Path) -> dict:
    """Tokenize, frame and fit every pair; save {train,eval} under `out` (a `Builder`)."""
    dpo, data = cfg.dpo, cfg.data
    # Chat pairs may leave the prompt out (implicit prompt); text pairs need all three.
    fields = (dpo.chosen_field, dpo.rejected_field) if data.format == "chat" else \
        (dpo.prompt_field, dpo.chosen_field, dpo.rejected_field)
    for dataset in raw.values():
        missing = [f for f in fields if dataset is not None and f not in dataset.column_names]
        if missing:
            raise ConfigError(
                f"the preference data has no column {missing[0]!r} (dpo.prompt_field/chosen_field/rejected_field "
                f"name them); its columns: {', '.join(dataset.column_names)} (data=pydoc_pairs is the embedded "
                "preference data)")
    if raw["eval"] is None:  # every eval_every-th pair is held out, as for language modelling
        held_out = np.arange(len(raw["train"])) % data.eval_every == 0
        raw = {"train": raw["train"].select(np.flatnonzero(~held_out)), "eval": raw["train"].select(np.flatnonzero(held_out))}
    encode = EncodePairs(tokenizer, cfg)
    work = out / "work"
    work.mkdir(parents=True)
    report = {"pairs": 0, "truncated": 0, "identical": 0, "dropped_without_response": 0, "dropped_malformed": 0}
    first_id = 0
    for name in ("train", "eval"):
        dataset = raw[name]
        num_proc = data.num_proc if data.num_proc and len(dataset) >= 2 * data.num_proc else None
        encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, features=ENCODED_FEATURES,
                              num_proc=num_proc, cache_file_name=str(work / f"{name}.arrow"), desc=f"pairs ({name})")
        malformed = int(np.sum(encoded.with_format("numpy")["malformed"]))
        encoded = encoded.filter(lambda row: not row["malformed"]).remove_columns("malformed")
        if len(encoded) == 0:
            raise ConfigError(f"the {name} split has no pair left after preprocessing ({len(dataset)} read, "
                              f"{malformed} not conversations)")
        report["pairs"] += len(dataset)
        report["dropped_malformed"] += malformed
        report["dropped_without_response"] += len(dataset) - len(encoded) - malformed
        report["truncated"] += int(np.sum(encoded.with_format("numpy")["truncated"]))
        report["identical"] += int(np.sum(encoded.with_format("numpy")["identical"]))
        report[f"{name}_pairs"] = len(encoded)
        encoded = encoded.remove_columns(["truncated", "identical"]).add_column("id", np.arange(first_id, first_id + len(encoded)))
        encoded.save_to_disk(str(out / name))
        first_id += len(encoded)
    shutil.rmtree(work)
    _warn_about(report, cfg)
    return report


class EncodePairs:
    """A batched `map` function: raw pairs in, both sides' ids and labels out; pairs with an
    empty response are dropped, chat pairs that are not conversations marked `malformed`."""

    def __init__(self, tokenizer, cfg: DictConfig):
        self.tokenizer = tokenizer
        dpo, data = cfg.dpo, cfg.data
        self.fields = (dpo.prompt_field, dpo.chosen_field, dpo.rejected_field)
        self.chat = data.format == "chat"
        self.pre_pend, self.ignore_index = data.pre_pend or "", data.ignore_index
        self.framing = formats.framing(tokenizer, data, pairs=True, templated=self.chat)
        self.template = formats.chat_template(tokenizer, formats.load_chat_template(data.chat_template)) if self.chat else None
        self.max_len, self.max_prompt_len = cfg.train.max_seq_len, max_prompt_len(cfg)

    def __call__(self, batch: dict) -> dict:
        sides = self._chat_sides(batch) if self.chat else self._text_sides(batch)
        out = {name: [] for name in ENCODED_FEATURES}
        for pair in sides:
            if pair is None:  # malformed: kept as an empty marker row so that it is counted
                for name in ENCODED_FEATURES:
                    out[name].append(True if name == "malformed" else False if name in ("truncated", "identical") else [])
                continue
            keep = 1 if formats.starts_with_bos(self.tokenizer, pair[0][0]) else 0
            pair, truncated = fit_pair(pair, self.max_len, self.max_prompt_len, keep)
            if not all(any(trained[1:]) for _, trained in pair):  # a row's first token is never a target
                continue
            for side, (ids, trained) in zip(SIDES, pair):
                out[f"{side}_input_ids"].append(ids)
                out[f"{side}_labels"].append([t if m else self.ignore_index for t, m in zip(ids, trained)])
            out["truncated"].append(truncated)
            out["identical"].append(pair[0] == pair[1])  # the same ids and the same trained tokens
            out["malformed"].append(False)
        return out

    def _text_sides(self, batch: dict) -> list[list[Side]]:
        """Plain text: [BOS] prompt response [EOS] for each side, the response (and EOS) trained."""
        prompts, *responses = (batch[field] for field in self.fields)
        if not all(isinstance(value, str) for column in (prompts, *responses) for value in column):
            raise ConfigError(
                f"data.format=text reads plain-text pairs: {', '.join(self.fields)} must be strings "
                "(for lists of messages use data.format=chat)")
        prompt_ids = _ids(self.tokenizer, [self.pre_pend + p for p in prompts])
        chosen_ids, rejected_ids = (_ids(self.tokenizer, texts) for texts in responses)
        bos, eos = ([self.framing.bos], [self.framing.eos]) if self.framing else ([], [])

        def side(prompt: list[int], response: list[int]) -> Side:
            return bos + prompt + response + eos, [False] * (len(bos) + len(prompt)) + [True] * (len(response) + len(eos))

        return [[side(p, c), side(p, r)] for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]

    def _chat_sides(self, batch: dict) -> list:
        """Chat: the prompt's messages plus each response's, rendered by the chat template; only
        the response's assistant tokens are trained. None for a pair that is not a conversation."""
        from jinja2 import TemplateError

        pairs = []
        prompt_field, *response_fields = self.fields
        prompts = batch[prompt_field] if prompt_field in batch else [None] * len(batch[response_fields[0]])
        for prompt, *responses in zip(prompts, *(batch[field] for field in response_fields)):
            if prompt_field not in batch:
                prompt, responses = shared_prompt(*responses)
            turns = [_assistant_turns(response) for response in responses]
            conversations = [list(prompt or []) + t for t in turns] if isinstance(prompt, list) else None
            if conversations is None or any(formats.conversation_problem(c) for c in conversations) \
                    or any(not t for t in turns):
                pairs.append(None)
                continue
            try:
                pairs.append([formats.render_conversation(
                    self.tokenizer, c, self.template,
                    train_on=[j for j in range(len(prompt), len(c)) if c[j]["role"] == "assistant"]) for c in conversations])
            except TemplateError:
                pairs.append(None)
        return pairs


def shared_prompt(chosen, rejected) -> tuple:
    """Implicit prompt: (the messages both conversations start with, [chosen's rest, rejected's
    rest]); (None, ...) when they are not both lists of messages or share nothing."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return None, [chosen, rejected]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return (chosen[:shared] or None), [chosen[shared:], rejected[shared:]]


def _assistant_turns(response) -> list:
    """A response as messages: a string is one assistant turn, a message a list of one."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if isinstance(response, dict):
        return [response]
    return list(response or [])


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [ids.tolist() for ids, _ in formats.encode(tokenizer, texts)]


def fit_pair(pair: list[Side], max_len: int, max_prompt_len: int, keep: int) -> tuple[list[Side], bool]:
    """Both sides cut to `max_len` tokens: first the shared prompt loses tokens from its start
    (after the first `keep`, a BOS), only as many as needed and never below `max_prompt_len`;
    then each response loses its end. Returns the pair and whether anything was cut."""
    longest = max(len(ids) for ids, _ in pair)
    if longest <= max_len:
        return pair, False
    prompt_len = pair[0][1].index(True) if True in pair[0][1] else len(pair[0][1])
    cut = min(longest - max_len, max(0, prompt_len - keep - max_prompt_len))
    fitted = [(ids[:keep] + ids[keep + cut:], trained[:keep] + trained[keep + cut:]) for ids, trained in pair]
    return [(ids[:max_len], trained[:max_len]) for ids, trained in fitted], True


def _warn_about(report: dict, cfg: DictConfig) -> None:
    if report["identical"]:
        log.warning("%d of %d pairs have the same chosen and rejected response (after fitting to "
                    "train.max_seq_len): they carry no preference and train to no effect; check dpo.chosen_field "
                    "and dpo.rejected_field", report["identical"], report["pairs"])
    if report["truncated"]:
        log.warning("%d of %d pairs are longer than train.max_seq_len=%d: their prompts were cut from the start "
                    "(to at least %d tokens, dpo.max_prompt_len), then their responses at the end",
                    report["truncated"], report["pairs"], cfg.train.max_seq_len, max_prompt_len(cfg))
    if report["dropped_without_response"]:
        log.warning("dropped %d of %d pairs with an empty chosen or rejected response",
                    report["dropped_without_response"], report["pairs"])
    if report["dropped_malformed"]:
        log.warning("dropped %d of %d chat pairs that are not conversations (a prompt that is not a list of "
                    "{role, content} messages, an unknown role, content that is not a string, or refused by "
                    "the chat template)", report["dropped_malformed"], report["pairs"])
