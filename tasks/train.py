"""The `train` task: supervised fine-tuning of a causal LM (next-token prediction on the
preprocessed rows of `data`), then a HuggingFace model in `<output_dir>/final-model`.

What a training run does is the run skeleton's (launcher/trainer.py); what is particular to
supervised fine-tuning, its data and its loss, is launcher/language_modeling.py.
"""

from omegaconf import DictConfig

from launcher.language_modeling import LanguageModeling
from launcher.trainer import Trainer


def train(cfg: DictConfig) -> dict:
    return Trainer(cfg, LanguageModeling(cfg)).run()
