"""This machine's CPU: whether its int8 kernels saturate u8 x s8 pairs in int16 (x86 without VNNI), from its flags.

Standard library only, so that a script without torch (``benchmarks/time_onnx.py``) can load it by path.
:mod:`fqss_plugin.export.saturation` says which files such a CPU gets wrong.
"""
from __future__ import annotations

import platform
from pathlib import Path

VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"}
SATURATING_FLAGS = {"avx2", "avx512bw"}
"""x86 ISA extensions whose int8 kernels use ``vpmaddubsw`` (saturating) unless one of ``VNNI_FLAGS`` is there."""
CPUINFO = "/proc/cpuinfo"


def _cpuinfo(cpuinfo: str | Path) -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> set[str]:
    """The CPU flags Linux reports (empty where ``/proc/cpuinfo`` has none)."""
    return set(_cpuinfo(cpuinfo).get("flags", "").split())


def cpu_saturates_u8s8(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU whose int8 kernels use ``vpmaddubsw`` (AVX2 or AVX-512BW) without VNNI."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpu_flags() if flags is None else flags
    return bool(flags & SATURATING_FLAGS) and not flags & VNNI_FLAGS


def cpu_class() -> str:
    """``"VNNI CPU"`` or ``"CPU without VNNI"`` (x86 with saturating u8 x s8 kernels): benchmark sections keep them apart."""
    return "CPU without VNNI" if cpu_saturates_u8s8() else "VNNI CPU"


def describe_cpu(cpuinfo: str | Path = CPUINFO) -> str:
    """``model name; relevant flags`` for benchmark tables."""
    info = _cpuinfo(cpuinfo)
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    shown = sorted(flags & (VNNI_FLAGS | SATURATING_FLAGS | {"avx512f", "fma", "amx_int8", "avx512_bf16"}))
    return f"{model}; flags: {' '.join(shown) or 'none of avx2/avx512/vnni'}; " + \
        ("saturating u8 x s8 kernels (no VNNI)" if cpu_saturates_u8s8(flags) else "no u8 x s8 saturation")
