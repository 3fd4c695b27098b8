"""Warm start: booted Linux guests kept as snapshots and restored instead of booted.

``guest.py``  a guest booted to readiness (its agent answers) or restored from a
              snapshot of that moment, its configuration's key, and what makes a
              restored guest fresh (entropy, clock) — shared by ``pykvm run -- CMD``
              and the pytest plugin's ``linux_vm``
``cache.py``  the directory of those snapshots: entries, locking, LRU eviction
``run.py``    ``pykvm run -- CMD`` through the agent: cold the first time, then warm
``cli.py``    ``pykvm cache list|clear``
"""
