"""Builds memtrain._C (csrc/) with pybind11; links liburing where its headers are installed
(apt install liburing-dev), else the swap engine uses its thread-pool backend only."""
from __future__ import annotations

import os
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def have_liburing() -> bool:
    if os.environ.get("MEMTRAIN_NO_URING") == "1":
        return False
    dirs = ["/usr/include", "/usr/local/include", *os.environ.get("CPATH", "").split(":")]
    return any(d and Path(d, "liburing.h").is_file() for d in dirs)


uring = have_liburing()
ext = Pybind11Extension(
    "memtrain._C",
    sources=["csrc/module.cpp", "csrc/swap/io_engine.cpp"],
    include_dirs=["csrc"],
    define_macros=[("MEMTRAIN_HAVE_URING", "1")] if uring else [],
    libraries=["uring"] if uring else [],
    cxx_std=17,
    extra_compile_args=["-O2"],
)
setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
