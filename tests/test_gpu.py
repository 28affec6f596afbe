"""The CUDA path: the same properties the CPU tests prove, on a GPU. Run with `pytest -m gpu`.

Not part of the default run (pyproject's addopts deselects the `gpu` marker); on a machine without
CUDA they are skipped even when selected.
"""

import pytest
import torch

from lmforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmforge.generate import generate
from lmforge.models.gpt import GPT
from lmforge.objectives.clm import CausalLM
from lmforge.train.trainer import Trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = dict(family="gpt", vocab_size=97, max_seq_len=64, n_layer=2, n_head=4, d_model=32)


def _model(**over) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **over}))


def test_cuda_cached_decoding_equals_full_recompute():
    m = _model().cuda().eval()
    prompt = [5, 17, 3, 88, 41]
    out = generate(m, [prompt], max_new_tokens=20, temperature=0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(m(torch.tensor([seq], device="cuda"))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_cuda_sdpa_equals_math_in_bf16():
    sdpa, math_ = _model(attn_impl="sdpa").cuda(), _model(attn_impl="math").cuda()
    math_.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 97, (3, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        a, b = sdpa(x).float(), math_(x).float()
    torch.testing.assert_close(a, b, rtol=0, atol=3e-2)


def test_cuda_bf16_training_step_matches_cpu_fp32():
    """One optimizer step on CUDA in bf16 autocast: same loss as CPU fp32 within bf16 precision."""
    batch = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "bf16")):
        cfg = RunConfig(model=ModelConfig(**TINY), data=DataConfig(seq_len=32),
                        train=TrainConfig(device=device, dtype=dtype, warmup_steps=1, max_steps=3))
        trainer = Trainer(cfg, _model(), CausalLM(cfg, None), out_dir="/nonexistent", progress=False)
        out = []
        for _ in range(3):
            w = batch.to(trainer.device)
            acc, total, _ = trainer.accumulate([{"input_ids": w[:, :-1], "labels": w[:, 1:]}])
            out.append(trainer.optimizer_step(acc, total)[0])
            trainer.step += 1
        losses[device] = out
    assert losses["cuda"][-1] < losses["cuda"][0]  # it learns
    for a, b in zip(losses["cpu"], losses["cuda"]):
        assert abs(a - b) < 0.05, losses


def test_cuda_fused_cross_entropy_equals_torch():
    """The compiled (Triton) loss + gradient kernel on CUDA == F.cross_entropy in fp32."""
    from lmforge import kernels
    from lmforge.objectives.clm import lm_loss

    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 33, 1000, generator=g) * 4
    labels = torch.randint(0, 1000, (4, 33), generator=g)
    labels[1, :7] = -100
    ours = base.cuda().to(torch.bfloat16).requires_grad_()
    ref = base.cuda().to(torch.bfloat16).requires_grad_()
    loss, n = lm_loss(ours, labels.cuda())
    loss.backward()
    ref_loss = torch.nn.functional.cross_entropy(ref.float().flatten(0, 1), labels.cuda().flatten(),
                                                 ignore_index=-100, reduction="sum")
    ref_loss.backward()
    assert kernels.enabled(), "the Triton kernel failed to compile (the eager fallback ran)"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), rtol=0, atol=8e-3)
