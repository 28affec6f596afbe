"""AdamW parameter groups and LR schedules equal hand-computed values and torch's own AdamW."""

import math

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig, TrainConfig
from lmforge.models.gpt import GPT
from lmforge.train.optim import build_optimizer, lr_at, param_groups


def test_decay_groups_split_by_rank():
    model = GPT(ModelConfig(vocab_size=64, max_seq_len=8, n_layer=1, n_head=2, d_model=16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {
        "tok_emb.weight", "pos_emb.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.o.weight",
        "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight",
    }  # the tied head is tok_emb and appears once
    assert all(names[id(p)].endswith(("bias", "ln1.weight", "ln2.weight", "ln_f.weight"))
               for p in no_decay["params"])
    n_unique = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_unique


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_optimizer_matches_reference_adamw(impl):
    """Our groups + AdamW step == one decoupled-weight-decay Adam step written out by hand."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    t = TrainConfig(lr=0.1, weight_decay=0.5, beta1=0.9, beta2=0.95, eps=1e-8)
    opt = build_optimizer(model, t, impl=impl)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad = torch.full_like(w0, 0.2)
    model.bias.grad = torch.full_like(b0, -0.3)
    opt.step()
    # step 1: m = (1-b1) g, v = (1-b2) g^2, m_hat = g, v_hat = g^2 -> update = g / (|g| + eps) = sign(g)
    upd_w = 0.2 / (0.2 + 1e-8)
    upd_b = -0.3 / (0.3 + 1e-8)
    torch.testing.assert_close(model.weight.detach(), w0 * (1 - 0.1 * 0.5) - 0.1 * upd_w)
    torch.testing.assert_close(model.bias.detach(), b0 - 0.1 * upd_b)  # no decay on the bias


def test_warmup_cosine_by_hand():
    t = TrainConfig(lr=6e-4, min_lr=6e-5, warmup_steps=4, max_steps=14, schedule="cosine")
    assert lr_at(0, t) == pytest.approx(1.5e-4)
    assert lr_at(3, t) == pytest.approx(6e-4)
    assert lr_at(4, t) == pytest.approx(6e-4)  # decay starts at progress 0
    # step 9: progress 5/10, cos(pi/2) = 0 -> halfway between lr and min_lr
    assert lr_at(9, t) == pytest.approx(3.3e-4)
    # step 6: progress 0.2 -> min + 0.5 (1 + cos(0.2 pi)) (lr - min)
    assert lr_at(6, t) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(0.2 * math.pi)) * 5.4e-4)
    assert lr_at(14, t) == pytest.approx(6e-5) and lr_at(100, t) == pytest.approx(6e-5)


def test_linear_and_constant_by_hand():
    lin = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10, schedule="linear")
    assert [lr_at(s, lin) for s in (0, 5, 8, 10, 12)] == pytest.approx([1.0, 0.5, 0.2, 0.0, 0.0])
    const = TrainConfig(lr=2.0, min_lr=0.1, warmup_steps=2, max_steps=10, schedule="constant")
    assert [lr_at(s, const) for s in (0, 1, 2, 9, 50)] == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0])


def test_a_schedule_that_is_all_warmup_ends_at_min_lr():
    """warmup_steps = max_steps (allowed): the decay span is empty; past max_steps the lr is min_lr, no
    division by zero."""
    for schedule in ("cosine", "linear"):
        t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=5, max_steps=5, schedule=schedule)
        assert [lr_at(s, t) for s in (0, 4)] == pytest.approx([0.2, 1.0])
        assert lr_at(6, t) == pytest.approx(0.1) and lr_at(50, t) == pytest.approx(0.1)
        assert 0.1 <= lr_at(5, t) <= 1.0


def test_schedule_is_a_pure_function_of_step():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    forward = [lr_at(s, t) for s in range(120)]
    backward = [lr_at(s, t) for s in reversed(range(120))][::-1]
    assert forward == backward
    assert max(forward) == pytest.approx(1e-3) and min(forward[10:]) == pytest.approx(1e-4)


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_second_adamw_step_uses_both_betas(impl):
    """Step 1 of Adam is sign(g) whatever the betas; step 2, written out by hand, depends on each of them."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    b1, b2, lr, wd, eps = 0.9, 0.95, 0.1, 0.5, 1e-8
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=wd, beta1=b1, beta2=b2, eps=eps), impl=impl)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    g1, g2 = 0.2, -0.4
    for g in (g1, g2):
        model.weight.grad = torch.full_like(w, g)
        model.bias.grad = torch.full_like(b, g)
        opt.step()
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2  # moments after two steps
    v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    upd2 = (m / (1 - b1**2)) / (math.sqrt(v / (1 - b2**2)) + eps)  # -0.3634 (with beta2 = beta1: -0.3605)
    upd1 = g1 / (abs(g1) + eps)
    w1 = w * (1 - lr * wd) - lr * upd1  # decoupled decay, then the Adam update
    torch.testing.assert_close(model.weight.detach(), w1 * (1 - lr * wd) - lr * upd2)
    torch.testing.assert_close(model.bias.detach(), b - lr * upd1 - lr * upd2)
