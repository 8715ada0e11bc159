# A shim: the package is declared in setup.cfg.
from setuptools import setup

setup()
