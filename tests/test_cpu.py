"""The CPU's facts from /proc/cpuinfo, and the precision and kernel choices made from them."""

from heavyranker.cpu import CpuInfo, bf16_warning, cpu_info, preferred_matmul

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: not the first entry
"""


def test_the_first_processor_entry_is_read(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    cpu = cpu_info(path)
    assert cpu == CpuInfo(
        "AMD EPYC 9R14", "AuthenticAMD", frozenset({"fpu", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
    )
    assert cpu.precision_flags == ["avx512f", "avx512_bf16", "avx512_vnni"]


def test_without_cpuinfo_nothing_is_known_and_nothing_warned(tmp_path):
    cpu = cpu_info(tmp_path / "absent")
    assert cpu.flags is None and cpu.precision_flags == []
    assert bf16_warning(cpu) is None


def test_bf16_warning_names_the_cpu_when_neither_bf16_flag_is_there():
    assert bf16_warning(CpuInfo("Xeon", "GenuineIntel", frozenset({"avx512_bf16", "amx_bf16"}))) is None
    assert bf16_warning(CpuInfo("Xeon", "GenuineIntel", frozenset({"amx_bf16"}))) is None
    warning = bf16_warning(CpuInfo("Old Xeon", "GenuineIntel", frozenset({"avx512f", "avx512_vnni"})))
    assert warning is not None and "Old Xeon" in warning and "\n" not in warning
    assert "10-100x" in warning


def test_bf16_warning_on_an_intel_cpu_without_amx_and_not_on_amd():
    """Intel's AVX-512 BF16 without AMX: measured slower than fp32 (docs/precision.md); AMD's: not
    measured, so not warned."""
    warning = bf16_warning(CpuInfo("Xeon 8480", "GenuineIntel", frozenset({"avx512f", "avx512_bf16"})))
    assert warning is not None and "Xeon 8480" in warning and "no amx_bf16" in warning and "\n" not in warning
    assert bf16_warning(CpuInfo("EPYC 9R14", "AuthenticAMD", frozenset({"avx512f", "avx512_bf16"}))) is None


def test_the_measured_kernel_rule():
    intel, amd = (CpuInfo("x", vendor, frozenset()) for vendor in ("GenuineIntel", "AuthenticAMD"))
    assert preferred_matmul(intel, "fp32") == "aten"
    assert preferred_matmul(amd, "fp32") == "onednn"
    assert preferred_matmul(intel, "bf16") == preferred_matmul(amd, "bf16") == "onednn"
    assert preferred_matmul(CpuInfo("x", "", None), "fp32") == "onednn"
