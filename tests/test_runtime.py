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
