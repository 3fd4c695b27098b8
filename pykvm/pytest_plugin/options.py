"""The plugin's options, read the same way everywhere: the command line first, then
the environment variable (``--pykvm-device`` / ``PYKVM_DEVICE``, ...), and what a
test does when KVM cannot be used: skip, or fail under ``--pykvm-require``.
"""

from __future__ import annotations

import os

import pytest


def option(config, name: str, env: str):
    value = config.getoption(name, default=None)
    return value if value is not None else (os.environ.get(env) or None)


def required(config) -> bool:
    """--pykvm-require, or PYKVM_REQUIRE set to anything but 0/no/false/off."""
    value = option(config, "pykvm_require", "PYKVM_REQUIRE")
    return value is True or (isinstance(value, str)
                              and value.strip().lower() not in ("0", "no", "false", "off"))


def cannot_run(config, reason: str) -> None:
    """Skip the test for ``reason`` (something this host lacks), or fail it under
    --pykvm-require: a CI job that needs its VM tests must not pass without them."""
    if required(config):
        pytest.fail(f"{reason} (--pykvm-require / PYKVM_REQUIRE turns this skip into a "
                    f"failure)", pytrace=False)
    pytest.skip(reason)


def kvm_device(config) -> str:
    from pykvm.kvm import DEFAULT_DEVICE
    return option(config, "pykvm_device", "PYKVM_DEVICE") or DEFAULT_DEVICE
