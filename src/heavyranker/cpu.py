"""The CPU the products run on: its model, vendor and the instruction-set flags that decide precision and
kernel choices (docs/precision.md). Linux's /proc/cpuinfo; elsewhere nothing is known, and nothing is
assumed. No torch here: bench/results.py records these facts without importing it."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CPUINFO = Path("/proc/cpuinfo")
# bf16 products in hardware: AVX-512 BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or AMX.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# What a figure of bf16 or int8 speed depends on; bench results list the ones present.
PRECISION_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni", "avx_vnni")

Matmul = Literal["onednn", "aten"]


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str  # "GenuineIntel", "AuthenticAMD", or "" where unknown
    flags: frozenset[str] | None  # None: not known (no /proc/cpuinfo)

    @property
    def precision_flags(self) -> list[str]:
        return [f for f in PRECISION_FLAGS if self.flags is not None and f in self.flags]


def cpu_info(path: Path = CPUINFO) -> CpuInfo:
    """The first processor's entry (every core of a machine reports the same)."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return CpuInfo(platform.processor() or platform.machine(), "", None)
    flags = frozenset(fields["flags"].split()) if "flags" in fields else None
    return CpuInfo(fields.get("model name", platform.machine()), fields.get("vendor_id", ""), flags)


def bf16_warning(cpu: CpuInfo, subject: str = "training.precision: bf16") -> str | None:
    """One line for a CPU where bf16 products are slower than fp32 ones: without bf16 instructions (emulated),
    or an Intel one with AVX-512 BF16 but no AMX (measured: docs/precision.md). None where bf16 pays, or may
    (AMD's AVX-512 BF16: not measured), or where the flags are not known. `subject`: what runs in bf16."""
    if cpu.flags is None or "amx_bf16" in cpu.flags:
        return None
    if "avx512_bf16" not in cpu.flags:
        return (
            f"{subject} on {cpu.model}, whose flags have neither avx512_bf16 nor amx_bf16: "
            "bf16 products run without hardware support, often 10-100x slower than fp32 (docs/precision.md)"
        )
    if cpu.vendor == "GenuineIntel":
        return (
            f"{subject} on {cpu.model}, an Intel CPU with avx512_bf16 but no amx_bf16: its "
            "bf16 products are slower than fp32 ones (0.56x on a Xeon of this kind); bf16 pays with AMX "
            "(docs/precision.md)"
        )
    return None


def preferred_matmul(cpu: CpuInfo, precision: str) -> Matmul:
    """Where the dense layers' products run fastest on this CPU (model/linear.py), by a measured rule.

    fp32: oneDNN on AMD (Zen 4: training step 249-261 ms against 285-325 ms on MKL), aten (MKL) on Intel
    (a Sapphire Rapids: 454 examples/s against 424; docs/precision.md's Xeons: 393 against 375 without AMX,
    381 against 362 with it).
    bf16: oneDNN everywhere: aten sends a bf16 product to oneDNN too, through addmm and extra casts."""
    if precision == "fp32" and cpu.vendor == "GenuineIntel":
        return "aten"
    return "onednn"
