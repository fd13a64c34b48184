"""Tandem harness: drives the C engine and the JAX reference side by side.

Only `harness.engine` (with its parts engine_lib and engine_ops) touches libtandem; everything
else goes through it.
"""

__version__ = "0.1.0"
