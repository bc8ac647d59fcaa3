"""The one compiled part: the trace writer's line formatter (buselab/trace/_fastlines.c).

Optional: where it cannot be built (no C compiler or no Python headers), buselab
installs anyway and the trace writer formats every line in Python, only slower.
Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("buselab.trace._fastlines", ["buselab/trace/_fastlines.c"], optional=True, extra_compile_args=["-O2"])
    ]
)
