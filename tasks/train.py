"""The `train` task: supervised fine-tuning of a causal LM (next-token prediction on the
preprocessed rows of `data`), then a HuggingFace model in `<output_dir>/final-model`.

What a training run does is the run skeleton's (launcher/training/trainer.py); what is particular
to supervised fine-tuning, its data and its loss, is `LanguageModeling` below (task=evaluate
reports the same loss).
"""

import torch
from omegaconf import DictConfig

from launcher.data.loaders import PadCollator
from launcher.data.preprocessing import prepared_splits
from launcher.model.losses import loss_chunk_size, token_loss_sum, trained_tokens
from launcher.training.trainer import Trainer, TrainingTask


def train(cfg: DictConfig) -> dict:
    return Trainer(cfg, LanguageModeling(cfg)).run()


class LanguageModeling(TrainingTask):
    """Cross-entropy of every labelled next token; the loss is the mean per trained token."""

    name = "train"

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.ignore_index = cfg.data.ignore_index
        self.chunk_size = loss_chunk_size(cfg.train)

    def datasets(self, tokenizer, world):
        return prepared_splits(self.cfg, tokenizer, world)

    def collator(self, tokenizer):
        return PadCollator(tokenizer.pad_token_id, self.ignore_index, self.cfg.data.document_mask)

    def weight(self, batch: dict) -> torch.Tensor:
        return trained_tokens(batch["labels"], self.ignore_index)

    def loss(self, model, batch: dict):
        return token_loss_sum(model, batch, self.ignore_index, batch["input_ids"].device, self.chunk_size), {}
