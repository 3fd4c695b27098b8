"""The kernel ABI of KVM: request numbers, ctypes structs, and one ioctl() call."""

from . import requests, structs
from .call import ioctl, is_interrupted, libc, raw_ioctl, request_name
from .requests import *  # noqa: F401,F403 - the constants are the module's API
