"""What a benchmark ran on, printed at its top: speed figures mean nothing without it.

CPU model, usable cores, and the flags that decide bf16 speed (AMX, AVX512-BF16, AVX-512,
AVX2), or the GPU's name and memory; torch's version and thread count.
"""

import os
import platform

import torch

FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_model_and_flags():
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in FLAGS if f in flags]


def describe():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model, flags = cpu_model_and_flags()
    cpu = (f"CPU {model}, {cores} cores, flags: {' '.join(flags) or 'none of ' + ' '.join(FLAGS)}"
           f"; native bf16: {'yes' if {'amx_bf16', 'avx512_bf16'} & set(flags) else 'no'}")
    parts = [cpu, f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"GPU {props.name} x{torch.cuda.device_count()}, "
                        f"{props.total_memory / 2 ** 30:.0f} GiB")
    return "; ".join(parts)


if __name__ == "__main__":
    print(describe())
