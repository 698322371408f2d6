from setuptools import setup

# All metadata lives in setup.cfg; this file keeps `pip install -e .` working
# with older setuptools and is what the design card asks for.
setup()
