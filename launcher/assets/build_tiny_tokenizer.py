"""Builds the tiny model's byte-level BPE tokenizer from the embedded pydoc corpus, with a chat
template (launcher/assets/tiny_bpe/chat_template.jinja) for data.format=chat.

The result is committed under launcher/assets/tiny_bpe so that the default job needs no
network and no training step. Re-run this script only to change the vocabulary:

    python -m launcher.assets.build_tiny_tokenizer
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from launcher.data.sources import pydoc_documents

VOCAB_SIZE = 4096
BOS, EOS = "<s>", "</s>"
OUT_DIR = Path(__file__).parent / "tiny_bpe"
# Role headers are plain text; an assistant turn ends with EOS (its end-of-turn token, so generation
# stops there), which needs no new special token. Contents are trimmed, so each one starts after a
# newline and ends before a special token: its tokens are the same as the content's alone. The
# {% generation %} block marks the trained tokens for transformers' return_assistant_tokens_mask.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
    {{- message['role'] + ':\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}{{- message['content'] | trim + eos_token -}}{%- endgeneration -%}
    {%- else -%}
        {{- message['content'] | trim -}}
    {%- endif -%}
    {{- '\n\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'assistant:\n' -}}
{%- endif -%}
"""


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [text for _, text in pydoc_documents()]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # No pad token on purpose: the loader's fallback (pad = EOS) is what real checkpoints need.
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, model_max_length=1024, chat_template=CHAT_TEMPLATE
    )
    wrapped.save_pretrained(OUT_DIR)
    print(f"saved {len(wrapped)} tokens to {OUT_DIR}")


if __name__ == "__main__":
    main()
