#!/usr/bin/env bash
# Build fxquant's wheel, install it (not editable) into a clean virtual environment, and import
# every module of the installed package from outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
rm -rf build
trap 'rm -rf "$work" build' EXIT
"$PY" -m venv "$work/venv"
PIP="$work/venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0 setuptools wheel
"$work/venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$work/dist" .
$PIP "$work"/dist/fxquant-*.whl
cd "$work"
"$work/venv/bin/python" - "$OLDPWD" <<'PY'
import importlib
import pkgutil
import sys
from pathlib import Path

import fxquant

checkout = Path(sys.argv[1]).resolve()
where = Path(fxquant.__file__).resolve()
assert checkout not in where.parents, f"fxquant imported from the checkout ({where}), not the wheel"
# `python -m` entry points run when imported: their package is imported instead
names = sorted(m.name for m in pkgutil.walk_packages(fxquant.__path__, "fxquant.") if not m.name.endswith(".__main__"))
for name in names:
    importlib.import_module(name)
for sub in ("fxquant.passes", "fxquant.kernels", "fxquant.session", "fxquant.keep_acc", "fxquant.cli",
            "fxquant.inspection", "fxquant.linger"):
    assert sub in names, f"{sub} missing from the wheel"
from fxquant.kernels import c_kernels

for kernel in ("large_codes", "codes_gemv"):
    source = c_kernels.SOURCES / f"{kernel}.c"
    assert source.is_file(), f"{source} missing from the wheel (C kernels built on first use)"
print(f"wheel OK: imported {len(names) + 1} modules from {where.parent}")
PY
