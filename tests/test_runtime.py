"""runtime: glibc allocator tuning (keep_freed_memory) and the CPU peak-FLOPs guess."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from lmforge import runtime

# Allocate, touch and free a 64 MiB tensor 14 times; print the page faults of the last 4 rounds.
# (Tuned, the heap grows for the first few rounds until freed blocks coalesce, then stops.)
PROBE = """
import resource, sys, torch
from lmforge import runtime
if sys.argv[1] == "tuned":
    assert runtime.keep_freed_memory()
def round_():
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
for _ in range(10):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_page_faults_on_reuse():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    # 4 rounds x 64 MiB = 16k pages of 4 KiB: faulted in again each round by default, reused when tuned
    assert faults("default") > 8000
    assert faults("tuned") < 500


def test_peak_flops_cpu_scales_with_threads_and_dtype():
    cpu = torch.device("cpu")
    assert runtime.peak_flops(cpu, "bf16") == 4 * runtime.peak_flops(cpu, "fp32")
    assert runtime.peak_flops(cpu, "bf16") == torch.get_num_threads() * 2.5e9 * 256


def test_pick_device_checks_cuda_and_its_index(monkeypatch):
    from lmforge.errors import ConfigError

    assert runtime.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not valid"):
        runtime.pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"CUDA is not available; use --device=cpu"):
        runtime.pick_device("cuda", flag="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.pick_device("cuda:0") == torch.device("cuda:0")
    assert runtime.pick_device("cuda") == torch.device("cuda")
    msg = r"has 1 CUDA device\(s\) \(cuda:0..cuda:0\); use --train.device=cuda:0"
    with pytest.raises(ConfigError, match=msg):
        runtime.pick_device("cuda:3")


def test_autocast_is_bf16_for_bf16_and_off_for_fp32():
    cpu = torch.device("cpu")
    a = torch.randn(4, 4)
    with runtime.autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with runtime.autocast(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("name, bf16", [("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA L4", 121e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA GeForce RTX 4090", 165e12)])
def test_peak_flops_cuda_reads_the_datasheet_dense_bf16_figure(monkeypatch, name, bf16):
    """NVIDIA's dense bf16 tensor-core peaks; fp32 (TF32) is half. "A10" must not catch an A100."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert runtime.peak_flops(cuda, "bf16") == bf16
    assert runtime.peak_flops(cuda, "fp32") == bf16 / 2


def test_seed_everything_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = draws()
    runtime.seed_everything(11)
    assert draws() == expected
    runtime.seed_everything(2**32 + 11)  # numpy takes 32-bit seeds: the same numpy stream
    assert draws()[1] == expected[1]


def test_pick_device_refuses_an_index_equal_to_the_device_count(monkeypatch):
    from lmforge.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        runtime.pick_device("cuda:2")
