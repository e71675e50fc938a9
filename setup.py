from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("pgfast._wire", ["pgfast/_wire.pyx"]),
         Extension("pgfast._relay", ["pgfast/_relay.pyx"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
