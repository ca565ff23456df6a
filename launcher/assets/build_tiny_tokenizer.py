"""Builds the tiny model's byte-level BPE tokenizer from the embedded pydoc corpus.

The result is committed under launcher/assets/tiny_bpe so that the default job needs no
network and no training step. Re-run this script only to change the vocabulary:

    python -m launcher.assets.build_tiny_tokenizer
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from launcher.sources import pydoc_documents

VOCAB_SIZE = 4096
BOS, EOS = "<s>", "</s>"
OUT_DIR = Path(__file__).parent / "tiny_bpe"


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
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, model_max_length=1024
    )
    wrapped.save_pretrained(OUT_DIR)
    print(f"saved {len(wrapped)} tokens to {OUT_DIR}")


if __name__ == "__main__":
    main()
