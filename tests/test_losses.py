"""train.loss=chunked_cross_entropy: the loss and every gradient equal the plain cross-entropy of the
full logits, for each model type it accepts, under LoRA, and without full logits ever existing."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.model.losses import CHUNKED_MODEL_TYPES, token_loss_sum

IGNORE = -100
VOCAB = 96
HIDDEN = 32
CPU = torch.device("cpu")


def _tiny(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        num_local_experts=2, num_experts_per_tok=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (3, 17), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = IGNORE  # a prompt
    labels[2, 11:] = IGNORE  # padding
    return {"input_ids": input_ids, "labels": labels}


def _reference_loss(model, batch) -> torch.Tensor:
    """The textbook next-token loss: logits of positions 0..n-2 against labels 1..n-1."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_chunked_matches_reference(model, batch, chunk_size):
    expected_loss, expected_grads = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    loss, grads = _loss_and_grads(model, lambda: token_loss_sum(model, batch, IGNORE, CPU, chunk_size))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in expected_grads.items():  # relative to the tensor's norm: elements near 0 cancel
        assert (grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


@pytest.mark.parametrize("model_type", CHUNKED_MODEL_TYPES)
def test_chunked_loss_and_gradients_equal_the_full_cross_entropy(model_type):
    # 3 x 17 = 51 tokens in chunks of 7: the last chunk is short, and chunks cross row boundaries.
    _assert_chunked_matches_reference(_tiny(model_type), _batch(), chunk_size=7)


def test_chunked_loss_under_lora_trains_the_adapters_like_the_full_loss():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    for name, parameter in model.named_parameters():  # non-zero B: the adapters change the logits
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    _assert_chunked_matches_reference(model, _batch(), chunk_size=10)


def test_the_default_loss_is_the_full_cross_entropy():
    model, batch = _tiny("llama"), _batch()
    with torch.no_grad():
        loss = token_loss_sum(model, batch, IGNORE, CPU)
        torch.testing.assert_close(loss, _reference_loss(model, batch), rtol=1e-6, atol=0)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op produces with the vocab as its last dimension,
    other than the head's weight and its gradient (hidden x vocab)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            logits_like = isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == VOCAB
            if logits_like and HIDDEN not in tensor.shape:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("chunk_size,largest", [(None, 3 * 17 * VOCAB), (8, 8 * VOCAB)])
def test_chunked_loss_never_holds_more_than_a_chunk_of_logits(chunk_size, largest):
    model, batch = _tiny("llama"), _batch()
    with _LargestVocabTensor() as recorder:
        token_loss_sum(model, batch, IGNORE, CPU, chunk_size).backward()
    assert recorder.largest == largest  # forward and backward: logits, log-softmax, their gradients
