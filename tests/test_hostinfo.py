"""Host probes for benchmark records (maskdecay_examples.hostinfo)."""
from __future__ import annotations

import os

from maskdecay_examples import hostinfo


def test_cpu_name_reads_the_model_name_and_falls_back(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert hostinfo.cpu_name(str(info)) == "AMD EPYC 7B13 64-Core Processor"
    info.write_text("processor\t: 0\nmodel name\t:\n")  # empty, as some VMs report it
    fallback = hostinfo.cpu_name(str(tmp_path / "missing"))
    assert fallback and hostinfo.cpu_name(str(info)) == fallback


def test_cpu_features_lists_the_vector_extensions_in_a_fixed_order(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx512_bf16 avx2 fma avx512f "
                    "avx512_vnni avx512vl\nprocessor\t: 1\nflags\t\t: avx2\n")
    assert hostinfo.cpu_features(str(info)) == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # arm64
    assert hostinfo.cpu_features(str(info)) == ["asimd", "sve", "bf16", "i8mm"]
    info.write_text("processor\t: 0\n")
    assert hostinfo.cpu_features(str(info)) == [] and hostinfo.cpu_features(str(tmp_path / "missing")) == []
    assert hostinfo.cpu_label("AMD EPYC", ["avx2", "fma"]) == "AMD EPYC [avx2 fma]" and hostinfo.cpu_label("X", []) == "X"
    assert hostinfo.cpu_label() == hostinfo.cpu_label(hostinfo.cpu_name(), hostinfo.cpu_features())


def test_peak_rss_mb_reads_vmhwm_and_says_none_when_unknown(tmp_path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9000000 kB\nVmHWM:\t  2097152 kB\nVmRSS:\t 1048576 kB\n")
    assert hostinfo.peak_rss_mb(str(status)) == 2048.0
    status.write_text("Name:\tpython\n")
    assert hostinfo.peak_rss_mb(str(status)) is None and hostinfo.peak_rss_mb(str(tmp_path / "missing")) is None
    if os.path.exists("/proc/self/status"):  # Linux: this process is resident, so its peak is positive
        assert hostinfo.peak_rss_mb() > 0
