"""Maps the repo's top-level folders into one installed `sol` namespace.

The repo keeps the agreed layout (core/, app/, plugins/, resources/);
installed, they become sol.core, sol.app, sol.plugins and sol.resources so
they never clash with other distributions' `core` or `app` packages.
Everything else about the distribution is in pyproject.toml.
"""
from setuptools import find_namespace_packages, setup

TOP = ["core", "app", "plugins", "resources"]

packages, package_dir = [], {}
for top in TOP:
    package_dir[f"sol.{top}"] = top
    packages.append(f"sol.{top}")
    packages += [f"sol.{top}.{sub}" for sub in find_namespace_packages(top, exclude=["*__pycache__*"])]

setup(packages=packages, package_dir=package_dir)
