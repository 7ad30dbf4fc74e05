"""Package discovery: fxquant/ with every subpackage, and passes/ and kernels/ installed as
fxquant.passes and fxquant.kernels (with theirs), the C sources that kernels/ builds on first use
included. Metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = {"fxquant": "fxquant", "fxquant.passes": "passes", "fxquant.kernels": "kernels"}

packages = []
for name, folder in FOLDERS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=FOLDERS, package_data={"fxquant.kernels": ["csrc/*.c"]})
