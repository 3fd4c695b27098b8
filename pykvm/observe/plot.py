"""`pykvm run --stats-plot FILE.svg|png`: the --stats numbers as one picture.

Three panels, readable without the text table:
  1. per vCPU, a stacked bar of its wall time: guest (inside KVM_RUN, which
     includes KVM's in-kernel work), pykvm's exit handlers, other (paused,
     waiting, the run loop itself);
  2. the exits by where they were finished: by exit reason to pykvm, and, when
     KVM's binary stats are available, the exits KVM finished in the kernel;
  3. the exits to pykvm by device.

matplotlib is an optional dependency (``pip install 'pykvm[plot]'``), imported
only when a plot is asked for.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import ConfigError
from . import output
from .kvmstats import KernelCounters, kernel_split

FORMATS = (".svg", ".png")
COLORS = {"guest": "#4c72b0", "pykvm handlers": "#dd8452", "other": "#b0b0b0",
          "kernel": "#55a868"}


def check_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"--stats-plot {path}: the file name must end in .svg or .png")
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--stats-plot needs matplotlib, which is not installed: "
                          "pip install 'pykvm[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as pyplot
    return pyplot


def plot_stats(path: str | Path, stats, *, kernel: KernelCounters | None = None,
               host_kind: str = "", wall_s: float | None = None, title: str = "pykvm") -> Path:
    """Draw ``stats`` (a list of VcpuStats) into ``path`` (.svg or .png)."""
    path = check_path(path)
    plt = _pyplot()
    figure, (time_ax, reason_ax, device_ax) = plt.subplots(
        3, 1, figsize=(9, 3.2 + 1.0 * max(len(stats), 1) + 5.5),
        gridspec_kw={"height_ratios": [max(len(stats), 1) * 0.7 + 0.8, 2.2, 2.2]})
    wall_s = wall_s if wall_s is not None else max((st.wall_ns for st in stats), default=0) / 1e9
    figure.suptitle(f"{title}: where the time and the exits went\n"
                    f"host {host_kind or 'unknown'}, wall time {wall_s:.3f} s, "
                    f"{len(stats)} vCPU(s), {sum(st.total_exits for st in stats)} exits to pykvm",
                    fontsize=11)
    _time_split(time_ax, stats)
    _exit_mix(reason_ax, stats, kernel)
    _devices(device_ax, stats)
    figure.tight_layout()
    try:
        with output.create(path, "--stats-plot", "wb") as stream:
            figure.savefig(stream, format=path.suffix.lower()[1:])
    except OSError as error:
        raise ConfigError(f"--stats-plot {path}: cannot write it: {error.strerror}") from None
    finally:
        plt.close(figure)
    return path


def _time_split(ax, stats) -> None:
    labels = [f"vCPU {st.vcpu_id}" for st in stats] or ["(no vCPU)"]
    parts = [("guest", [st.guest_ns / 1e9 for st in stats]),
             ("pykvm handlers", [st.handler_ns / 1e9 for st in stats]),
             ("other", [st.other_ns / 1e9 for st in stats])]
    left = [0.0] * len(stats)
    for name, values in parts:
        bars = ax.barh(labels[:len(values)], values, left=left, color=COLORS[name], label=name)
        for bar, value, st in zip(bars, values, stats):
            share = value * 1e9 / (st.wall_ns or 1)
            if share >= 0.06:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2,
                        f"{name}\n{100 * share:.0f}%", ha="center", va="center", fontsize=8,
                        color="white" if name != "other" else "black")
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("seconds of wall time per vCPU")
    ax.set_title("time split: guest (inside KVM_RUN, incl. KVM's in-kernel work) / "
                 "pykvm exit handlers / other", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), fontsize=8, ncol=3, frameon=False)
    ax.invert_yaxis()


def _exit_mix(ax, stats, kernel) -> None:
    reasons: Counter = Counter()
    for st in stats:
        reasons.update(st.exits_by_name())
    names = [f"{name} (to pykvm)" for name, _ in reasons.most_common()]
    values = [n for _, n in reasons.most_common()]
    colors = [COLORS["pykvm handlers"]] * len(values)
    if kernel is not None and kernel.available:
        in_kernel = sum(kernel_split(counters, st.total_exits).get("in_kernel", 0)
                        for st, counters in zip(stats, kernel.vcpus))
        emulated = sum(c.get("insn_emulation", 0) for c in kernel.vcpus
                       if isinstance(c.get("insn_emulation", 0), int))
        names.insert(0, "finished in KVM (kernel)")
        values.insert(0, in_kernel)
        colors.insert(0, COLORS["kernel"])
        if emulated:
            names.insert(1, "instructions KVM emulated (not exits)")
            values.insert(1, emulated)
            colors.insert(1, COLORS["guest"])
    _bars(ax, names, values, colors, "exits by reason: where they were finished"
          + ("" if kernel is not None and kernel.available else " (KVM's own counters unavailable)"))


def _devices(ax, stats) -> None:
    devices: Counter = Counter()
    for st in stats:
        devices.update(st.devices)
        if st.unhandled_pio:
            devices["(no device: port)"] += st.unhandled_pio
        if st.unhandled_mmio:
            devices["(no device: MMIO)"] += st.unhandled_mmio
    pairs = devices.most_common(12)
    _bars(ax, [name for name, _ in pairs], [n for _, n in pairs],
          [COLORS["pykvm handlers"]] * len(pairs), "exits to pykvm by device")


def _bars(ax, names, values, colors, title) -> None:
    if not values:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    else:
        bars = ax.barh(names, values, color=colors)
        for bar, value in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value}",
                    va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.15 or 1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("count")
