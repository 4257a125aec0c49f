#!/bin/bash
# For a GPU or TPU machine with JAX installed but no access to a package registry: fetch,
# on a machine that has one, the wheels of the packages such an image often lacks (grain,
# array_record, ml_collections, portpicker) into .whl/ (git ignores it), copy the checkout
# with .whl/ over, and install them there without a registry:
#
#   bash experiments/accelerator_wheels.sh        # here; PY=3.11 for another Python there
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD OUT=$OUT \
#     bash experiments/accelerator_benchmark.sh   # there
#
# The versions are this checkout's, so both machines run the same input pipeline and configs.
set -eu
PIP=${PIP:-.venv/bin/pip}
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
wanted=()
for package in grain array_record ml_collections portpicker; do
  v=$(version "$package")
  wanted+=("$package${v:+==$v}")
done
rm -rf .whl
"$PIP" download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl "${wanted[@]}"
ls .whl
