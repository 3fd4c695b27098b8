import os

import pytest

from pykvm.errors import KvmUnavailable


def kvm_unavailable_reason() -> str | None:
    from pykvm.kvm import Kvm
    try:
        Kvm().close()
    except KvmUnavailable as error:
        return str(error)
    return None


_REASON = kvm_unavailable_reason()
needs_kvm = pytest.mark.skipif(_REASON is not None, reason=f"needs /dev/kvm: {_REASON}")


@pytest.fixture
def kvm():
    if _REASON is not None:
        pytest.skip(f"needs /dev/kvm: {_REASON}")
    from pykvm.kvm import Kvm
    with Kvm() as handle:
        yield handle


def on_pvm() -> bool:
    from pykvm.kvm import detect_host_kind
    return detect_host_kind() == "kvm_pvm"


def pytest_collection_modifyitems(config, items):
    """`slow` tests (a Debian kernel's boot: many minutes on kvm_pvm) run only when asked
    for with PYKVM_SLOW_TESTS=1; `make test` and CI leave them out."""
    if os.environ.get("PYKVM_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PYKVM_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
