from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("pgfast._framing", ["pgfast/_framing.pyx"]),
         Extension("pgfast._pump", ["pgfast/_pump.pyx"]),
         Extension("pgfast._relay", ["pgfast/_relay.pyx"]),
         Extension("pgfast._tlsstream", ["pgfast/_tlsstream.pyx"]),
         Extension("pgfast._txrelay", ["pgfast/_txrelay.pyx"]),
         Extension("pgfast._shared", ["pgfast/_shared.pyx"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
