"""What the machine computes with: the launcher's choice of the CPU, native bf16 on GPUs and
CPUs, and the memory layout that is fastest there."""

from __future__ import annotations

from typing import Optional, TYPE_CHECKING

import torch
from accelerate.utils import parse_flag_from_env

if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig


def launcher_chose_cpu() -> bool:
    """Whether this run computes on the CPU: the launcher said so (`accelerate launch --cpu`,
    a `use_cpu: true` config, ACCELERATE_USE_CPU=1), or there is no CUDA device."""
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def gpu_has_native_bf16(device: Optional[torch.device] = None) -> bool:
    """bf16 in hardware: compute capability 8 (Ampere) or newer. torch.cuda.is_bf16_supported()
    also says yes on a T4 or V100 (7.x), where bf16 is emulated and slower than fp16/fp32."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 (Linux /proc/cpuinfo): without them bf16 autocast is emulated and
    slower than fp32 (measured on an AVX2 EPYC: EfficientNet-Lite0 1.8 vs 5.7 img/s)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Sapphire Rapids and newer): bf16 training pays on these CPUs;
    AVX512-BF16 alone speeds up inference, not training."""
    try:
        with open("/proc/cpuinfo") as fh:
            return "amx_bf16" in fh.read()
    except OSError:
        return False


def use_channels_last(cfg: TrainConfig, accelerator: Accelerator) -> bool:
    """--channels-last / --no-channels-last, or the measured default (see config.py)."""
    if cfg.channels_last is not None:
        return cfg.channels_last
    return not (accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
                and not cpu_has_native_bf16())
