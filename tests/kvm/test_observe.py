"""pykvm/observe/ as one concern with data flowing one way (docs/architecture.md).

The import graph is read from the source (tests/import_graph.py), so a cycle
hidden behind a function-level import is found too.
"""

from __future__ import annotations

import io
import re
import time

import pytest

from pykvm import layout
from pykvm.boot.modes import set_mode
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from pykvm.observe import output
from pykvm.observe.wiring import Observation, ObserveOptions
from pykvm.vstate.vm import Vm

from ..asm import assemble
from ..import_graph import ROOT, find_cycle, graph, reachable
from ..ports import ExitPort, SerialOut
from .test_trace import BASE, SERIAL_GUEST

# What observe/ may build on: the ABI, errors, reading guest state, and the sandbox
# (a confined vCPU thread waits for its module preload before capstone is used). Never
# the VM, the vCPU, the machine, the CLI or the control socket: they call observe/.
OBSERVE_MAY_IMPORT = {"pykvm.ioctl", "pykvm.errors", "pykvm.guest", "pykvm.sandbox"}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_observe_has_no_import_cycle_and_imports_only_downwards():
    edges = graph((ROOT / "observe").glob("*.py"))
    assert "pykvm.observe.report" in edges and "pykvm.observe.trace_filter" in edges
    assert find_cycle(edges) is None
    for module, imports in edges.items():
        outside = {m for m in imports if not m.startswith("pykvm.observe")}
        assert all(any(m == allowed or m.startswith(allowed + ".") for allowed in OBSERVE_MAY_IMPORT)
                   for m in outside), (module, outside)


def test_observe_is_in_no_cycle_of_the_whole_package():
    """vcpu.py imports observe.stats; nothing in observe/ may lead back to it."""
    edges = graph(ROOT.rglob("*.py"))
    observe = sorted(m for m in edges if m.startswith("pykvm.observe"))
    assert len(observe) >= 10
    assert [m for m in observe if m in reachable(edges, m)] == []


def test_data_flows_one_way_between_stats_kvmstats_and_report():
    edges = graph((ROOT / "observe").glob("*.py"))
    assert "pykvm.observe.report" not in edges["pykvm.observe.stats"]
    assert "pykvm.observe.report" not in edges["pykvm.observe.kvmstats"]
    assert "pykvm.observe.stats" not in edges["pykvm.observe.kvmstats"]
    assert {"pykvm.observe.stats", "pykvm.observe.kvmstats"} <= edges["pykvm.observe.report"]


# --- the wiring: one library call for the CLI, the plugin, the control socket -----------------------
def run_observed(kvm, options: ObserveOptions, *, timing: bool = False):
    """SERIAL_GUEST under an Observation, as `pykvm run` wires it; (observation, vm stats)."""
    code = assemble(SERIAL_GUEST, "real", 0)
    with Observation(options, out=io.StringIO()) as observation, \
            GuestMemory.anonymous(4 << 20) as memory, \
            Vm(kvm, memory, tracer=observation.tracer, timing=timing) as vm:
        vm.add_pio_device(0x3F8, 8, SerialOut())
        vm.add_pio_device(layout.EXIT_PORT, 1, ExitPort(vm))
        memory.write(BASE, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, "real", BASE)
        observation.attach(vm)
        hooks = vm.hooks
        wiring = ((hooks.pio, hooks.mmio, hooks.exit), hooks.wants_clock)
        stop = vm.run(timeout=20)
        assert stop is not None and stop.kind == "exit", stop
        observation.finish()
        report = observation.report({"wall time (s)": "1.000"}) if options.counting else ""
        return observation, wiring, report


def test_observation_off_wires_nothing_into_the_run_loop(kvm):
    observation, (observers, clock), _ = run_observed(kvm, ObserveOptions())
    assert observers == ((), (), ()) and clock is False   # the loop reads no clock, calls nothing
    assert observation.kernel is None and observation.printer is None
    assert observation.plot(1.0) is None


def test_observation_traces_counts_and_reports(kvm, tmp_path):
    trace = tmp_path / "trace.txt"
    observation, (observers, clock), report = run_observed(
        kvm, ObserveOptions(trace=str(trace), trace_filter=("port=0x3f8-0x3ff",), stats=True))
    tracer = observation.tracer
    assert observers == ((tracer.pio,), (tracer.mmio,), (tracer.exit,)) and clock is True
    assert observation.tracer._owned is None        # closed with the observation
    lines = trace.read_text().splitlines()
    assert lines[0].startswith("# pykvm trace:")
    assert len(lines[1:]) == 5 and all(" io " in line and "dev=serial" in line for line in lines[1:])
    assert report.startswith("vCPU 0: 6 exits to pykvm")
    assert f"host kind: {kvm.host_kind}" in report and "wall time (s): 1.000" in report
    snapshot = observation.kernel_snapshot
    assert snapshot is not None and (snapshot.available or snapshot.reason)
    if snapshot.available:
        assert snapshot.vcpu(0)["exits"] >= 6 and snapshot.vcpu(1) is None
    closed = observation.kernel.snapshot()       # the VM closed its stats fds with it
    assert not closed.available and closed.reason == "closed with its VM"


@pytest.mark.parametrize("options, fragment", [
    (ObserveOptions(trace_filter=("port=x",)), "not a number"),
    (ObserveOptions(trace_filter=("colour=red",)), "unknown key"),
    (ObserveOptions(stats_interval=0), "positive"),
    (ObserveOptions(stats_interval=float("nan")), "positive"),
    (ObserveOptions(stats_plot="p.jpg"), ".svg or .png"),
    (ObserveOptions(symbols="/nonexistent/vmlinux"), "cannot read"),
])
def test_observation_refuses_bad_options_before_anything_runs(options, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Observation(options)


def test_trace_file_is_not_written_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "trace.txt").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        Observation(ObserveOptions(trace=str(tmp_path / "trace.txt")))
    assert victim.read_text() == "keep me\n"


def test_a_truncated_elf64_header_is_a_config_error(tmp_path):
    from pykvm.observe.symbols import load

    elf = tmp_path / "short.elf"
    elf.write_bytes(b"\x7fELF\x02\x01" + bytes(0x38 - 6))   # longer than ELF32's header only
    with pytest.raises(ConfigError, match="truncated ELF header"):
        load(elf)


def test_trace_file_is_truncated_and_a_device_refused(tmp_path):
    old = tmp_path / "trace.txt"
    old.write_text("an older trace\n")
    with output.create(old, "--trace") as stream:
        stream.write("new\n")
    assert old.read_text() == "new\n"
    with pytest.raises(ConfigError, match="not a regular file"):
        output.create("/dev/null", "--trace")


# --- VcpuStats over the control socket: the answer of another process ------------------------------
def test_stats_survive_the_round_trip_through_json():
    import json

    from pykvm.observe.stats import VcpuStats

    stats = VcpuStats(3)
    stats.exits[2] = 7
    stats.port_counts[0x3F8 << 1 | 1] = 5
    stats.mmio[(0xD0000008, "write")] = 2
    stats.devices["serial"] = 5
    stats.quirks["syscall"] = 1
    stats.unhandled_pio, stats.guest_ns, stats.handler_ns = 4, 900, 100
    stats.started_ns, stats.stopped_ns = 10, 1010
    sent = stats.as_dict()
    assert VcpuStats.from_dict(json.loads(json.dumps(sent))).as_dict() == sent


@pytest.mark.parametrize("data, fragment", [
    ([], "want an object"),
    ({"vcpu": "0"}, "vcpu: want a count"),
    ({"vcpu": -1}, "vcpu: want a count"),
    ({"vcpu": 0, "exits": {"io": "many"}}, "exits.io: want a count"),
    ({"vcpu": 0, "exits": {"io": True}}, "exits.io: want a count"),
    ({"vcpu": 0, "pio": {"0x10000/out": 1}}, "is not ADDRESS/in|out"),
    ({"vcpu": 0, "pio": {"0x3f8": 1}}, "is not ADDRESS/in|out"),
    ({"vcpu": 0, "mmio": {"zz/read": 1}}, "is not ADDRESS/read|write"),
    ({"vcpu": 0, "devices": [1, 2]}, "devices: want an object"),
    ({"vcpu": 0, "time_ns": {"wall": 1 << 64}}, "time_ns.wall: want a count"),
])
def test_malformed_stats_are_a_typed_error(data, fragment):
    from pykvm.errors import StatsDecodeError
    from pykvm.observe.stats import VcpuStats

    with pytest.raises(StatsDecodeError, match=re.escape(fragment)):
        VcpuStats.from_dict(data)


@pytest.mark.parametrize("vcpus", [None, {"0": {}}, [{"vcpu": 0}] * 1025])
def test_a_malformed_vcpu_list_is_a_typed_error(vcpus):
    from pykvm.errors import StatsDecodeError
    from pykvm.observe.stats import from_answer

    with pytest.raises(StatsDecodeError, match="want a list"):
        from_answer(vcpus)
    assert [s.vcpu_id for s in from_answer([{"vcpu": 0}, {"vcpu": 1}])] == [0, 1]


def test_unknown_exit_reasons_from_a_newer_pykvm_are_skipped():
    from pykvm.observe.stats import VcpuStats

    stats = VcpuStats.from_dict({"vcpu": 1, "exits": {"io": 3, "some_new_exit": 9, "99": 1}})
    assert stats.exits_by_name() == {"io": 3}


# --- --profile: the guest's RIP sampled from a host thread ------------------------------------------
HOT_LOOP = "hot: jmp hot\n"
HALT_LOOP = "sti\nidle: hlt\njmp idle\n"     # halted with interrupts on: not a dead halt


def profile_spinning_guest(kvm, options: ObserveOptions, seconds: float = 0.6,
                           source: str = HOT_LOOP, min_samples: int = 0):
    """A real-mode guest spinning at offset 0 (symbol ``hot``) under --profile, for
    ``seconds`` and then until the sampler holds ``min_samples`` (a loaded host gives the
    sampler thread fewer ticks in the same wall time: count samples, not seconds)."""
    code = assemble(source, "real", 0)
    with Observation(options, out=io.StringIO()) as observation, \
            GuestMemory.anonymous(4 << 20) as memory, Vm(kvm, memory) as vm:
        memory.write(BASE, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, "real", BASE)
        observation.attach(vm)
        vm.start()
        assert not vm.wait_stopped(seconds)      # still spinning: the sampler ran meanwhile
        deadline = time.monotonic() + 60
        while sum(dict(observation.sampler.counts).values()) < min_samples \
                and time.monotonic() < deadline:
            assert not vm.wait_stopped(0.05)
        vm.request_stop("exit", 0, "test over")
        vm.wait(5)
        observation.finish()
        return observation


def test_profile_names_the_function_the_guest_spins_in(kvm, tmp_path):
    symbols = tmp_path / "System.map"
    symbols.write_text("0000000000000000 T hot\n0000000000000100 T cold\n")
    out = tmp_path / "profile.txt"
    observation = profile_spinning_guest(
        kvm, ObserveOptions(symbols=str(symbols), profile=str(out), profile_hz=200),
        min_samples=20)
    rows = observation.sampler.rows()
    assert rows[0].name == "hot" and rows[0].samples >= 20, rows
    assert "cold" not in [row.name for row in rows]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# pykvm RIP profile: ") and "1 vCPU(s) at 200 Hz" in lines[0]
    assert lines[2].split()[2] == "hot"


def test_profile_without_symbols_groups_by_page_and_replaces_a_symlink(kvm, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    out = tmp_path / "profile.txt"
    out.symlink_to(victim)
    observation = profile_spinning_guest(kvm, ObserveOptions(profile=str(out), profile_hz=200))
    assert observation.sampler.rows()[0].name == "[page 0x0]"
    assert victim.read_text() == "keep me\n" and not out.is_symlink()
    assert "[page 0x0]" in out.read_text()


def test_profile_counts_a_halted_vcpu_as_halted(kvm, tmp_path):
    observation = profile_spinning_guest(
        kvm, ObserveOptions(profile=str(tmp_path / "p.txt"), profile_hz=200), source=HALT_LOOP)
    rows = observation.sampler.rows()
    assert rows[0].name == "[halted]" and rows[0].share > 0.9, rows


@pytest.mark.parametrize("options, fragment", [
    (ObserveOptions(profile="/nonexistent/dir/p.txt"), "no directory"),
    (ObserveOptions(profile="p.txt", profile_hz=0), "--profile-hz"),
    (ObserveOptions(profile="p.txt", profile_hz=1e6), "--profile-hz"),
])
def test_profile_options_are_checked_before_anything_runs(options, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Observation(options)
