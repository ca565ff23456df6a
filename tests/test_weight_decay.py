"""Weight-decay groups: biases and norm weights are not decayed (transformers' Trainer and TRL's
grouping), checked against groupings written out by hand here, and one optimizer step against a
plain torch.optim.AdamW built from those hand-written groups."""

import pytest
import torch
from conftest import compose_config
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from launcher.training.optim import build_optimizer, parameter_groups

LLAMA_DECAYED = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
LLAMA_NOT_DECAYED = ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                     "model.norm.weight"]
GPT2_DECAYED = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
                "transformer.h.0.mlp.c_proj.weight"]  # lm_head.weight is tied to wte
GPT2_NOT_DECAYED = ["transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.bias",
                    "transformer.h.0.attn.c_proj.bias", "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
                    "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.weight",
                    "transformer.ln_f.bias"]


def llama():
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        num_key_value_heads=2, tie_word_embeddings=False))


def gpt2():
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))


def names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("build, decayed, not_decayed", [(llama, LLAMA_DECAYED, LLAMA_NOT_DECAYED),
                                                         (gpt2, GPT2_DECAYED, GPT2_NOT_DECAYED)])
def test_biases_and_norm_weights_are_not_decayed(build, decayed, not_decayed):
    torch.manual_seed(0)
    model = build()
    assert {name for name, _ in model.named_parameters()} == set(decayed) | set(not_decayed)  # the lists are whole
    cfg = compose_config([])
    decay, no_decay = parameter_groups(model, cfg.optimizer, decay_norms_and_biases=False)
    assert names(model, decay) == set(decayed) and "weight_decay" not in decay
    assert names(model, no_decay) == set(not_decayed) and no_decay["weight_decay"] == 0.0
    [everything] = parameter_groups(model, cfg.optimizer, decay_norms_and_biases=True)
    assert names(model, everything) == set(decayed) | set(not_decayed)


def perturbed(build):
    """The same model every call, its norm weights and biases moved off 1 and 0 so that decaying
    them would show."""
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p))
    return model


def one_step(model, optimizer) -> dict:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("build, decayed", [(llama, LLAMA_DECAYED), (gpt2, GPT2_DECAYED)])
def test_one_step_equals_plain_adamw_with_hand_written_groups(build, decayed):
    cfg = compose_config(["optimizer.weight_decay=1.0", "optimizer.lr=0.1"])
    model = perturbed(build)
    mine = one_step(model, build_optimizer(parameter_groups(model, cfg.optimizer, False), cfg.optimizer))
    reference = perturbed(build)
    params = dict(reference.named_parameters())
    plain = torch.optim.AdamW([{"params": [p for n, p in params.items() if n in decayed]},
                               {"params": [p for n, p in params.items() if n not in decayed], "weight_decay": 0.0}],
                              lr=0.1, weight_decay=1.0, betas=(0.9, 0.95), eps=1e-5)
    theirs = one_step(reference, plain)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    # train.decay_norms_and_biases=true is the old step: only the spared parameters differ
    model = perturbed(build)
    decay_all = one_step(model, build_optimizer(parameter_groups(model, cfg.optimizer, True), cfg.optimizer))
    for name in mine:
        assert torch.equal(mine[name], decay_all[name]) == (name in decayed), name
