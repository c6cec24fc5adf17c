"""What every benchmark shares: the ``--device`` option, a clock that is right on that device, and
the state of the machine that measured (device, threads, CPU flags, load), printed and stored with
the results so that a number is never read without the machine it came from.

Clock: on a CPU, a step is timed in CPU seconds of this process (``time.process_time``): with one
thread that is the step's own work, which stays meaningful on a machine shared with other jobs (the
wall clock there measures the scheduler's share). On CUDA the work runs asynchronously on the GPU:
the clock synchronises the device and reads the wall clock, once at each end of a timed region,
never inside it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import time
from pathlib import Path

import torch

from difflora.train.precision import BF16_CPU_FLAGS, cpu_flags, native_bf16

__all__ = [
    "add_allocator_argument",
    "add_device_argument",
    "clock",
    "machine",
    "machine_line",
    "minor_faults",
    "parse_device",
    "wall",
]

# The CPU flags that decide which kernels run (vector width, bf16 and int8 dot products, AMX tiles).
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", *BF16_CPU_FLAGS, "amx_tile", "amx_int8")


def add_device_argument(ap: argparse.ArgumentParser) -> None:
    """``--device`` (default cpu): where the models and tensors of the benchmark live."""
    ap.add_argument("--device", type=parse_device, default=torch.device("cpu"), help="cpu (default), cuda, cuda:1")


def parse_device(name: str) -> torch.device:
    """The device named ``name``; a CUDA device on a machine without one is refused here, not mid-run."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device {name}: the benchmarks run on cpu or cuda")
    return device


def clock(device: torch.device) -> float:
    """Seconds for the difference of two readings around a timed region (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def wall(device: torch.device) -> float:
    """The wall clock, the device synchronised first on CUDA (for benchmarks that report wall time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def add_allocator_argument(ap: argparse.ArgumentParser) -> None:
    """``--allocator``: ``steady`` keeps freed memory in the process; ``glibc`` leaves the C allocator as it is."""
    ap.add_argument(
        "--allocator",
        choices=["steady", "glibc"],
        default="steady",
        help="steady (default): freed memory stays in the process, so a timed step never faults fresh "
        "pages in; glibc: the C library's default (large blocks mapped and returned per allocation)",
    )


def steady_allocator() -> bool:
    """Make glibc keep freed memory (no mmap for blocks under 1 GiB, no trimming of the heap); True if set.

    By default glibc maps each large block (a tensor of a few MB) fresh and returns it when freed,
    adjusting that threshold as it goes: a step then pays a page fault per 4 KiB of every new large
    tensor (on the P1 layer, 14-17 ms of system time in a step of 35-54 ms), or none, depending on
    what was freed before. Alternated variants then time the allocator's state as much as their own
    work. Best effort: where the kernel left the heap no room to grow, glibc still maps a block.
    Other C libraries (musl, macOS) are left alone.
    """
    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def minor_faults() -> int:
    """Minor page faults of this process so far (a fresh page touched for the first time)."""
    import resource  # POSIX only: imported where it is used

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine(device: torch.device) -> dict:
    """The device, thread count, torch version, CPU flags that matter, native bf16 and the load
    average (1, 5, 15 minutes) at the time of the call."""
    info = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_flags": [f for f in SHOWN_FLAGS if f in cpu_flags()],
        "native_bf16": native_bf16(device),
        "loadavg": _loadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict) -> str:
    """``machine``'s dict as one line for a benchmark's output."""
    gpu = f" ({info['gpu']})" if "gpu" in info else ""
    return (
        f"device {info['device']}{gpu}, {info['threads']} thread(s), torch {info['torch']}, "
        f"CPU flags: {' '.join(info['cpu_flags']) or 'none of ' + ' '.join(SHOWN_FLAGS)}, "
        f"native bf16: {'yes' if info['native_bf16'] else 'no'}, load average {' '.join(map(str, info['loadavg']))}"
    )
