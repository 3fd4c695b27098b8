"""Kernel command-line words pykvm adds where guest ring 0 is emulated, and how a user's
own words override them.

Two sets, both applied by :class:`~pykvm.quirks.pvm.PvmQuirks` on kvm_pvm hosts only:

- :data:`LINUX_WORDS` for every Linux kernel: keep it away from the instructions the host's
  emulator cannot run (pvm.py says which and why);
- :data:`DEBIAN_WORDS` for Debian's own kernels (``linux-image-*-amd64``, recognised by the
  builder in their version string, :func:`is_debian`): cut the boot work that is cheap on
  hardware and costs minutes when every ring-0 instruction is emulated. Each cut was found
  by profiling a boot here (``pykvm run --profile``, ``initcall_debug``) and is explained
  below and in docs/hosts.md, with the times in bench/RESULTS.md.

Override rule: a word is left out when the command line already holds its key (the text
before ``=``), so ``--append mitigations=auto`` or ``--append initcall_blacklist=`` puts
Linux's own behaviour back. Linux takes the last value of most parameters but *adds up*
``initcall_blacklist`` lists, hence the rule instead of simply appending after the user.
"""

from __future__ import annotations

import re

# Debian 6.1 (bookworm) kernels, both the generic and the cloud flavour.
DEBIAN_WORDS = (
    # Skip these initcalls (init/main.c, initcall_blacklist):
    # - ftrace_check_for_weak_functions: a work item that looks up the symbol of every one
    #   of the ~38,000 ftrace call sites through kallsyms (kernel/trace/ftrace.c,
    #   test_for_valid_rec), to disable tracing of overridden weak functions: over a
    #   minute of one CPU's emulated ring 0 here. Without it such a call site may be listed
    #   under a wrong name; ftrace still checks a site's bytes before it patches one.
    # - blake2s_mod_init, crypto_kdf108_init: self-tests only (lib/crypto/blake2s.c,
    #   crypto/kdf_sp800108.c); the algorithms still work.
    # - cubictcp_register, bpf_prog_test_run_init: the built-ins that register BPF kfuncs,
    #   which parses and checks the whole vmlinux BTF (btf_parse_vmlinux, ~120,000 types):
    #   over 5 minutes here. TCP falls back to reno (tcp_cubic is not a module here).
    #   A module with BTF still triggers the parse when it loads (kernel/bpf/btf.c,
    #   btf_module_notify): a Debian initramfs that loads virtio modules pays it once.
    # - trace_eval_init, tracer_init_tracefs: work items that rewrite the print format of
    #   every trace event (trace_event_update_all) and create /sys/kernel/tracing with a
    #   directory per event (~2,000), holding trace_event_sem and event_mutex: init
    #   waited for them 1,050 s of guest time in one boot (init_blk_tracer), over 6
    #   minutes in another (init_kprobe_trace). The guest then has no tracefs files (no
    #   ftrace from inside it); --append initcall_blacklist= gives them back.
    "initcall_blacklist=ftrace_check_for_weak_functions,blake2s_mod_init,crypto_kdf108_init,"
    "cubictcp_register,bpf_prog_test_run_init,trace_eval_init,tracer_init_tracefs",
    # The crypto manager's self-test of every algorithm registered (crypto/testmgr.c).
    "cryptomgr.notests=1",
    # Debian turns on zeroing of every page allocated (CONFIG_INIT_ON_ALLOC_DEFAULT_ON):
    # clear_page in emulated ring 0 is a large share of the boot.
    "init_on_alloc=0",
    # Spectre/SRSO/retbleed mitigations: return thunks and retpolines double the
    # instructions of every call and return, all emulated. A trade-off for a guest kernel
    # that runs the user's own code; put them back with --append mitigations=auto.
    "mitigations=off",
    # One serial port probed, not four (drivers/tty/serial/8250).
    "8250.nr_uarts=1",
    # No audit subsystem (its initcalls and the kauditd thread).
    "audit=0",
)

# Debian's kernels tick at HZ=250, and where ring 0 is emulated one tick's work
# (scheduler_tick, PELT, RCU, timekeeping) takes milliseconds: over half of a 2-vCPU boot's
# samples were the tick, and under load a tick outlasted its 4 ms period. No command-line
# word lowers HZ, so pykvm slows the guest's clock instead (machine/boot.py tells Linux its
# TSC runs this many times faster than it does): its timer deadlines, ticks included, land
# that many times further apart in real time. The guest's clock, sleeps and timeouts run
# slow by the same factor (its RCU-stall and soft-lockup limits stay in proportion to its
# emulated CPU); `--clock-slowdown 1` gives real time back. Measured in bench/RESULTS.md
# ("debian boot").
DEBIAN_CLOCK_SLOWDOWN = 10

_WORD = re.compile(r"\S+")


def key(word: str) -> str:
    return word.split("=", 1)[0]


def merge(cmdline: str, words) -> str:
    """``cmdline`` plus each of ``words`` whose key it does not already hold."""
    present = {key(word) for word in _WORD.findall(cmdline)}
    added = [word for word in words if key(word) not in present]
    return " ".join([cmdline.strip(), *added]).strip()


def is_debian(version: str | None) -> bool:
    """Whether a kernel's version string is a Debian build: "6.1.0-57-cloud-amd64
    (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 ..."."""
    return bool(version) and "debian-kernel@" in version
