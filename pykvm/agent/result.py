"""What a command run in the guest did: its status and its output (:class:`Result`),
as pykvm.agent.AgentClient.exec returns it and the control socket carries it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass
class Result:
    """What a command did: its exit status (see EXIT above) and its output, separately."""

    status: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def returncode(self) -> int | None:
        """The status, named as in subprocess."""
        return self.status

    @property
    def text(self) -> str:
        """stdout decoded (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    def as_dict(self) -> dict:
        import base64
        return {"status": self.status, "stdout": base64.b64encode(self.stdout).decode(),
                "stderr": base64.b64encode(self.stderr).decode(),
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        import base64
        return cls(data.get("status"), base64.b64decode(data.get("stdout", "")),
                   base64.b64decode(data.get("stderr", "")), data.get("seconds", 0.0))


def describe(command) -> str:
    return command if isinstance(command, str) else shlex.join(command)
