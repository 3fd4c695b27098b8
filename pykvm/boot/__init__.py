"""How a guest starts: the Linux boot protocol, flat binaries, CPU modes and tables."""
