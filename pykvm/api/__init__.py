"""Other VMMs' APIs in front of pykvm's Machine: ``firecracker/`` speaks Firecracker's
REST API on a Unix socket and its command line (docs/firecracker.md)."""
