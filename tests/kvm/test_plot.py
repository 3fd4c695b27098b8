"""--stats-plot: the picture is drawn, is a valid PNG or SVG, and says what it shows."""

import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from pykvm.errors import ConfigError
from pykvm.observe.kvmstats import KernelCounters
from pykvm.observe.plot import check_path, plot_stats
from pykvm.observe.stats import VcpuStats

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_stats() -> list[VcpuStats]:
    stats = []
    for vcpu in range(2):
        st = VcpuStats(vcpu)
        st.started_ns, st.stopped_ns = 1_000, 1_000 + 2_000_000_000
        st.guest_ns, st.handler_ns = 1_500_000_000, 400_000_000
        st.exits[2] = 1000 + vcpu         # io
        st.exits[6] = 50                  # mmio
        st.devices["serial"] = 900
        st.devices["virtio-blk"] = 150 + vcpu
        st.unhandled_pio = 3
        stats.append(st)
    return stats


KERNEL = KernelCounters(True, {"pages_4k": 12},
                        ({"exits": 5000, "signal_exits": 10, "insn_emulation": 777},
                         {"exits": 4000, "signal_exits": 0}))


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_stats(tmp_path / "stats.png", sample_stats(), kernel=KERNEL, host_kind="kvm_test",
                      wall_s=2.5)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 600


def test_svg_says_what_it_shows(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.rcParams["svg.fonttype"] = "none"    # keep text as text, to read it back
    try:
        path = plot_stats(tmp_path / "stats.svg", sample_stats(), kernel=KERNEL,
                          host_kind="kvm_test", wall_s=2.5)
    finally:
        matplotlib.rcParams["svg.fonttype"] = "path"
    root = ElementTree.parse(path).getroot()
    assert root.tag.endswith("svg")
    text = " ".join("".join(node.itertext()) for node in root.iter()
                    if node.tag.endswith("text"))
    for words in ("host kvm_test", "wall time 2.500 s", "2 vCPU(s)", "vCPU 0", "vCPU 1",
                  "guest", "pykvm handlers", "other", "finished in KVM (kernel)",
                  "io (to pykvm)", "mmio (to pykvm)", "serial", "virtio-blk",
                  "(no device: port)", "6889"):       # (5000-1050-10) + (4000-1051) in the kernel
        assert words in text, words


def test_without_kernel_counters_and_empty(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_stats(tmp_path / "empty.svg", [VcpuStats(0)], kernel=KernelCounters(False, reason="test"))
    assert ElementTree.parse(path).getroot().tag.endswith("svg")


def test_bad_path_and_missing_matplotlib(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=".svg or .png"):
        check_path(tmp_path / "stats.jpg")
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'pykvm\[plot\]'"):
        plot_stats(tmp_path / "stats.png", sample_stats())


def test_cli_stats_plot(kvm, tmp_path):
    pytest.importorskip("matplotlib")
    from .test_trace import tutorial
    binary = tutorial("01-real-mode-hello")
    picture = tmp_path / "hello.png"
    result = subprocess.run([sys.executable, "-m", "pykvm", "run", "--flat", str(binary),
                             "--entry", "real", "--stats-plot", str(picture)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"statistics drawn in {picture}" in result.stderr
    assert picture.read_bytes()[:8] == PNG_MAGIC
