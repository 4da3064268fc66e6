"""What the machine is and can do: its name, load, memory and dense-matmul peak (for
`ddpm bench` and scripts/gpu_check.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config import Params
from ..model.unet import UNet

MEMORY_SHARE = 0.5  # of the available memory a CPU training batch may take


def benchmark():
    """torch.utils.benchmark, imported quietly: it imports cpp_extension, which logs a warning
    on a machine without a CUDA runtime."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark

    return torch.utils.benchmark


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, min_s: float) -> float:
    """TFLOP/s of the fastest timed block of size^3 matmuls: the practical dense peak."""
    gen = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=gen) for _ in "ab")
    out = torch.empty_like(a)
    m = benchmark().Timer("torch.matmul(a, b, out=out)",
                          globals={"torch": torch, "a": a, "b": b, "out": out},
                          num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_s)
    return 2 * size ** 3 / (min(m.raw_times) / m.number_per_run) / 1e12


def bf16_native(device: torch.device) -> bool:
    """Whether the device multiplies bf16 natively: then a bf16 matmul is the MFU denominator
    whatever precision training uses (an fp32 peak flatters fp32 training)."""
    if device.type == "cuda":
        return True
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def host_load() -> tuple[Optional[float], int]:
    """(1-minute load average, cores this process may use): other work slows every figure."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return (os.getloadavg()[0] if hasattr(os, "getloadavg") else None), cores


def peak_memory(device: torch.device, reset: bool = False) -> int:
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        return value
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB



def available_memory() -> Optional[int]:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def training_bytes(params: Params, batch: int) -> int:
    """Memory of a CPU training step: weights, gradients, two Adam moments and the EMA, plus
    what autograd keeps of one image's forward pass (measured at batch 1), times the batch."""
    torch.manual_seed(0)
    model = UNet(params.model)
    size, saved = params.preprocess.image_size, [0]

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 5 * weights + 2 * batch * saved[0]  # activations and their gradients


def train_batch(params: Params, device: torch.device) -> tuple[int, str]:
    """The params' batch, unless a CPU's memory cannot hold its step: then the largest that
    fits in MEMORY_SHARE of the available memory, and why."""
    batch = params.train.batch_size
    free = available_memory() if device.type == "cpu" else None
    if free is None or training_bytes(params, batch) <= MEMORY_SHARE * free:
        return batch, ""
    fits = max(1, batch)
    while fits > 1 and training_bytes(params, fits) > MEMORY_SHARE * free:
        fits //= 2
    return fits, (f"train.batch_size {batch} lowered to {fits} on the cpu: its step needs "
                  f"{training_bytes(params, batch) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
