"""buselab: a block device in userspace, with a live terminal lab around it."""

__version__ = "0.1.0"
