"""``pykvm cache list|clear``: the boot cache of ``pykvm run -- CMD`` (pykvm/warm/cache.py).

``list`` prints one line per cached boot, most recently used first: its key, the
bytes it takes on disk, when it was cached and last used, and its configuration;
then the total against the cap. ``clear`` removes them all. The default guest's
build (``pykvm guest``) and the pytest plugin's snapshots are not touched.
"""

from __future__ import annotations

from ..command_group import add_group


def add_parser(commands) -> None:
    """Add ``cache`` and its actions to pykvm's subcommands."""
    actions = add_group(
        commands, "cache", "ACTION",
        help="list or clear the booted guests `pykvm run -- CMD` restores",
        description="The boot cache: the first `pykvm run -- CMD` of a configuration boots "
                    "and keeps the booted guest in ${PYKVM_CACHE:-~/.cache/pykvm}/boots; "
                    "later runs restore it. At most $PYKVM_BOOT_CACHE_MAX bytes (default "
                    "2G), least recently used removed first.")
    listing = actions.add_parser("list", help="the cached boots: size, age, configuration")
    listing.set_defaults(handler=cmd_list)
    clear = actions.add_parser("clear", help="remove every cached boot")
    clear.set_defaults(handler=cmd_clear)


def age(seconds: float) -> str:
    """``seconds`` ago, short: 42s, 7m, 3h, 2d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def cmd_list(args) -> int:
    import time

    from .cache import BootCache, configured_cap, default_root

    cache = BootCache(default_root(), configured_cap())
    entries = cache.entries()
    now = time.time()
    for entry in entries:
        print(f"{entry.key}  {entry.size / 2**20:7.1f} MiB  cached {age(now - entry.created)} "
              f"ago, used {age(now - entry.last_used)} ago  {entry.describe()}")
    total = sum(entry.size for entry in entries)
    print(f"{len(entries)} cached boot(s), {total / 2**20:.1f} MiB of "
          f"{cache.cap / 2**20:.0f} MiB in {cache.root}")
    return 0


def cmd_clear(args) -> int:
    from .cache import BootCache, default_root

    cache = BootCache(default_root(), None)
    count, freed = cache.clear()
    print(f"removed {count} cached boot(s) ({freed / 2**20:.1f} MiB) from {cache.root}")
    return 0
