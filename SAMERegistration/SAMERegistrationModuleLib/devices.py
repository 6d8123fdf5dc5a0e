"""The compute devices the panel offers, found without importing PyTorch.

``nvidia-smi`` lists the NVIDIA GPUs in PCI bus order; the child process is started with
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that ``cuda:N`` there is GPU N here.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

QUERY = ["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
LOW_MEMORY_GIB = 8.0  # below this a full-resolution run may not fit; the panel says so


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024.0

    def describe(self) -> str:
        return f"{self.name}, {self.memory_gib:.0f} GiB"


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        try:
            gpus.append(Gpu(int(parts[0]), parts[1], int(float(parts[2]))))
        except ValueError:
            continue
    return gpus


def detect_gpus(timeout_s: float = 5.0) -> list[Gpu]:
    """NVIDIA GPUs on this machine; empty when there are none or no driver is installed."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        done = subprocess.run(
            [executable, *QUERY], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else []


def device_choices(gpus: list[Gpu]) -> list[tuple[str, str]]:
    """(label, device) pairs for the device selector: Auto, each GPU, CPU."""
    auto = f"Auto ({gpus[0].device} when usable, else CPU)" if gpus else "Auto (CPU: no GPU found)"
    return [
        (auto, "auto"),
        *((f"{gpu.device}: {gpu.describe()}", gpu.device) for gpu in gpus),
        ("CPU", "cpu"),
    ]


def describe_gpus(gpus: list[Gpu]) -> str:
    """One line for the panel: what was found, with a warning for small GPUs."""
    if not gpus:
        return "No NVIDIA GPU found: registration runs on the CPU (slower)."
    text = "; ".join(f"{gpu.device}: {gpu.describe()}" for gpu in gpus)
    if max(gpu.memory_gib for gpu in gpus) < LOW_MEMORY_GIB:
        text += (
            f". Less than {LOW_MEMORY_GIB:g} GiB of GPU memory: if it runs out, use a coarser "
            "working spacing or the CPU."
        )
    return text
