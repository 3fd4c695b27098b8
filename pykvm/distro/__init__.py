"""Distribution root filesystems: ``pykvm image debian`` builds one (debian.py) with the
distribution's own tools, and ``pykvm run --image`` boots it (see README, "A Debian root
filesystem")."""
