"""Distribution root filesystems: ``pykvm image debian`` builds one (debian.py) with the
distribution's own tools, and ``pykvm run --image`` boots it (see README, "A Debian root
filesystem")."""

# what ``pykvm image debian --help`` names: here so that the command line's parser (built
# by every pykvm run) need not import debian.py and its tools
DEBIAN_DEFAULT_SUITE = "bookworm"
DEBIAN_KERNEL_PACKAGE = "linux-image-cloud-amd64"
