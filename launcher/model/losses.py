"""The training loss: next-token cross-entropy summed over trained tokens, from full or chunked logits.

`train.loss=cross_entropy` runs the model and upcasts its (batch, seq, vocab) logits to fp32 at
once. `train.loss=chunked_cross_entropy` runs the decoder for the final hidden states, then the
output head and the cross-entropy over `train.loss_chunk_size` tokens at a time; each chunk's
logits are recomputed in the backward pass (torch.utils.checkpoint), so at most chunk x vocab
logits exist at any moment, for the cost of one more head matmul per token in the backward pass
(~2% of a Llama step).

Under FSDP2 the head and the final norm belong to the root unit, whose parameters are gathered by
the hooks around the root's `forward`. The chunked loss therefore runs as a method of the root
module that FSDP2 treats as a forward (`register_fsdp_forward_method`): gathered before, resharded
after, gradients reduced in the backward pass as for `forward` itself.
"""

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from launcher.errors import ConfigError, choice_error
from launcher.model.modeling import router_loss

LOSSES = ("cross_entropy", "chunked_cross_entropy")
# Model types whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`: no
# logit soft-capping or scaling that the chunked loss would skip (tests/test_losses.py checks each).
CHUNKED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "olmo2")
_METHOD = "hydralm_chunked_token_loss_sum"


def loss_chunk_size(train_cfg) -> Optional[int]:
    """Tokens per chunk for `token_loss_sum`; None: the full logits at once."""
    return train_cfg.loss_chunk_size if train_cfg.loss == "chunked_cross_entropy" else None


def check_loss(train_cfg, hf_config: dict) -> None:
    if train_cfg.loss not in LOSSES:
        raise choice_error("train.loss", train_cfg.loss, LOSSES)
    if train_cfg.loss_chunk_size < 1:
        raise ConfigError(f"train.loss_chunk_size={train_cfg.loss_chunk_size} must be >= 1")
    model_type = hf_config.get("model_type")
    if train_cfg.loss == "chunked_cross_entropy" and hf_config.get("output_router_logits"):
        raise ConfigError("train.loss=chunked_cross_entropy does not add a mixture of experts' router loss "
                          "(the model's output_router_logits=true); use train.loss=cross_entropy")
    if train_cfg.loss == "chunked_cross_entropy" and model_type not in CHUNKED_MODEL_TYPES:
        raise ConfigError(
            f"train.loss=chunked_cross_entropy supports model types {', '.join(CHUNKED_MODEL_TYPES)} "
            f"(logits = lm_head(last hidden state)), not {model_type}; use train.loss=cross_entropy"
        )


def token_loss_sum(model, batch: dict, ignore_index: int, device: torch.device,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Next-token cross-entropy summed over trained tokens, in fp32.

    The labels are shifted rather than the logits, so the logits are never sliced into a copy.
    `chunk_size`: compute the head and the loss that many tokens at a time (see the module doc).
    """
    labels = batch["labels"].to(device, non_blocking=True)
    next_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index).flatten()
    inputs = model_inputs(batch, device)
    if chunk_size is None:
        output = model(**inputs)
        loss = F.cross_entropy(output.logits.flatten(0, 1).float(), next_labels, ignore_index=ignore_index,
                               reduction="sum")
        router = router_loss(model, output)  # a mixture of experts' load balancing, as transformers adds it
        return loss if router is None else loss + router * (next_labels != ignore_index).sum()
    return _chunked_loss_method(model)(inputs, next_labels, ignore_index, chunk_size)


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The model's keyword arguments for a batch. With `data.document_mask`, the batch carries
    per-document `position_ids`: transformers then treats each document of a packed row as its
    own sequence (block-diagonal causal mask for sdpa/eager/flex attention, varlen kernels for
    flash attention), which it does only without an attention mask and without a KV cache."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    return inputs


def _chunked_loss_method(model):
    """The chunked loss bound to `model` (the root module), registered once as an FSDP2 forward
    method (a no-op without FSDP2)."""
    method = getattr(model, _METHOD, None)
    if method is None:
        setattr(model, _METHOD, types.MethodType(_chunked_token_loss_sum, model))
        register_fsdp_forward_method(model, _METHOD)
        method = getattr(model, _METHOD)
    return method


def _chunked_token_loss_sum(model, inputs: dict, next_labels: torch.Tensor, ignore_index: int,
                            chunk_size: int) -> torch.Tensor:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PeftModel
    hidden = causal_lm.get_decoder()(**inputs).last_hidden_state.flatten(0, 1)
    head = causal_lm.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = (head, hidden[start:start + chunk_size], next_labels[start:start + chunk_size], ignore_index)
        if torch.is_grad_enabled():  # keep only the chunk's inputs; its logits are recomputed in backward
            total = total + checkpoint(_head_loss_sum, *chunk, use_reentrant=False)
        else:
            total = total + _head_loss_sum(*chunk)
    return total


def _head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=ignore_index, reduction="sum")


def trained_tokens(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Tokens with a next-token target (a row's first token is never one)."""
    return (labels[:, 1:] != ignore_index).sum()


def sequence_log_probs(model, batch: dict, ignore_index: int) -> torch.Tensor:
    """log p(trained tokens | the tokens before them) of each row, summed over the row (fp32)."""
    labels = batch["labels"]
    next_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    logits = model(**model_inputs(batch, labels.device)).logits
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), next_labels.flatten(), ignore_index=ignore_index,
                                reduction="none")
    return -token_nll.view(labels.shape).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """The sigmoid DPO loss of each pair (Rafailov et al. 2023), conservative with
    `label_smoothing` (the probability that a preference is flipped), and the implicit rewards
    beta * log(policy / reference) of both responses. Arguments are sequence log-probs."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards, rejected_rewards
