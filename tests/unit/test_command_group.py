"""pykvm's command groups (pykvm/command_group.py): ``pykvm guest``, ``pykvm image`` and
``pykvm cache`` given without an action print their own help to stderr and exit 2."""

import pytest

from pykvm.cli import main


@pytest.mark.parametrize("group, metavar", [("guest", "ACTION"), ("image", "DISTRIBUTION"),
                                            ("cache", "ACTION")])
def test_a_group_without_an_action_prints_its_help_and_exits_2(capsys, group, metavar):
    assert main([group]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: ") and f"{group} [-h] {metavar}" in err.splitlines()[0]


def test_an_action_still_reaches_its_handler(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path))
    assert main(["cache", "list"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("0 cached boot(s)") and str(tmp_path) in out and err == ""
