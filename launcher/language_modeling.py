"""Next-token prediction on preprocessed rows: the training task of supervised fine-tuning
(task=train) and the loss task=evaluate reports."""

import torch
from omegaconf import DictConfig

from launcher.data import prepared_splits
from launcher.loaders import PadCollator
from launcher.losses import loss_chunk_size, token_loss_sum, trained_tokens
from launcher.trainer import TrainingTask


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
