"""Assemble a snippet of guest code with GNU as/ld, for tests that need a tiny guest."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

DIRECTIVE = {"real": ".code16", "protected": ".code32", "long": ".code64"}


def assemble(source: str, mode: str = "real", origin: int = 0) -> bytes:
    """Flat binary of ``source`` assembled for ``mode``, linked at ``origin``."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld (binutils) are not installed")
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = Path(tmp, "g.S"), Path(tmp, "g.o"), Path(tmp, "g.bin")
        src.write_text(f"{DIRECTIVE[mode]}\n.globl _start\n_start:\n{source}\n")
        bits = ["--64"] if mode == "long" else ["--32"]
        emulation = "elf_x86_64" if mode == "long" else "elf_i386"
        built = subprocess.run(["as", *bits, "-o", str(obj), str(src)], capture_output=True, text=True)
        assert built.returncode == 0, f"as failed:\n{built.stderr}"
        subprocess.run(["ld", "-m", emulation, f"-Ttext={origin:#x}", "--oformat", "binary",
                        "-o", str(out), str(obj)], check=True, capture_output=True)
        return out.read_bytes()
