"""Host probes for benchmark records: the CPU's name and vector extensions, and this process's peak memory.

Timings from two hosts are only comparable with the CPU named, and virtual machines often report one generic name
("AMD EPYC") for hosts of different generations, which the vector extensions tell apart. Used by ``evc bench``, the
ResNet example and the scripts in ``benchmarks/``.
"""
from __future__ import annotations

import platform

__all__ = ["cpu_name", "cpu_features", "cpu_label", "peak_rss_mb"]


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (the first ``model name`` of ``cpuinfo`` on Linux, else :func:`platform.processor`), for
    benchmark records: timings from two hosts are only comparable with the CPU named. Falls back to the
    architecture (``x86_64``)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: the vector extensions that decide how fast a CPU runs float32/bf16/int8 kernels, in the order reported
_FEATURES = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",  # x86
    "asimd", "sve", "sve2", "bf16", "i8mm",  # arm64
)


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU's vector extensions that matter for conv/GEMM speed (AVX2, AVX-512 and its VNNI/BF16/FP16 parts, AMX;
    on arm64 NEON, SVE, BF16, I8MM), from the first ``flags`` or ``Features`` line of ``cpuinfo``; [] where unknown.

    For benchmark records next to :func:`cpu_name`: two hosts of one generic name can differ by these alone, and
    with them by a large factor in speed."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    have = set(value.split())
                    return [name for name in _FEATURES if name in have]
    except OSError:
        pass
    return []


def cpu_label(name: str | None = None, features: list[str] | None = None) -> str:
    """``"NAME [feature feature ...]"`` for benchmark records, or the name alone when no feature is known; by
    default this machine's :func:`cpu_name` and :func:`cpu_features` (pass both to label a saved record)."""
    name = cpu_name() if name is None else name
    features = cpu_features() if features is None else features
    return f"{name} [{' '.join(features)}]" if features else name


def threads_label(n: int) -> str:
    """``"1 thread"`` / ``"N threads"``, for benchmark records."""
    return f"{n} thread" if n == 1 else f"{n} threads"


def peak_rss_mb(status: str = "/proc/self/status") -> float | None:
    """This process's peak resident memory so far, in MB (``VmHWM`` of ``status`` on Linux); None where the file or
    the field is missing. For benchmark records: a speed-up that needs twice the memory is a different trade."""
    try:
        with open(status, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "VmHWM" and value.split():
                    return round(int(value.split()[0]) / 1024, 1)  # the kernel reports kB
    except (OSError, ValueError):
        pass
    return None
