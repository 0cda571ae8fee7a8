"""In-tree PEP 517 backend: setuptools, plus cmake/ninja from PyPI only when the system lacks them.

Torch is never a build requirement (the extension is torch-free, see docs/architecture.md).
"""
import shutil

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403


def _extra():
    extra = []
    if shutil.which("cmake") is None:
        extra.append("cmake>=3.18")
    if shutil.which("ninja") is None:
        extra.append("ninja")
    return extra


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + _extra()


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + _extra()
