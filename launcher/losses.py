"""Losses of a micro-batch, summed (the run skeleton divides by the global batch's weight)."""

import torch
import torch.nn.functional as F


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The model's keyword arguments for a batch. With `data.document_mask`, the batch carries
    per-document `position_ids`: transformers then treats each document of a packed row as its
    own sequence (block-diagonal causal mask for sdpa/eager/flex, varlen kernels for flash
    attention), which it does only without an attention mask and without a KV cache."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    return inputs


def token_loss_sum(model, batch: dict, ignore_index: int, device: torch.device) -> torch.Tensor:
    """Next-token cross-entropy summed over trained tokens (fp32 logits).

    The labels are shifted rather than the logits, so the (batch, seq, vocab) logits are never
    sliced into a copy; the upcast is a no-op unless the model computes in bf16.
    """
    labels = batch["labels"].to(device, non_blocking=True)
    next_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    logits = model(**model_inputs(batch, device)).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), next_labels.flatten(), ignore_index=ignore_index,
                           reduction="sum")


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
