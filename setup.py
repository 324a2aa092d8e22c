"""The one compiled part: quant/qdot.c, the int8-activation dot products (see its header).
Everything else is in pyproject.toml. `optional`: without a C compiler the package still
installs, and the quantized layers keep torch's kernels (the start-up plan says so)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("unigemma.quant._qdot", ["unigemma/quant/qdot.c"],
                             extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"], extra_link_args=["-fopenmp"],
                             optional=True)])
