#!/bin/bash
# The wheels the lent GPU machine lacks, fetched here into .whl/ (git ignores it), for the
# device tool to carry: its image has jax, flax, optax, orbax-checkpoint and chex, but no
# grain or ml_collections, and it cannot reach a package registry.
#
#   bash experiments/accelerator_wheels.sh        # then, on the device (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD OUT=$OUT \
#     bash experiments/accelerator_benchmark.sh
#
# The device's python3 is CPython 3.12 on x86-64 (/work/.library/device/KINDS.md); versions
# are this checkout's, so both machines run the same input pipeline and configs.
set -eu
PIP=${PIP:-.venv/bin/pip}
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
wanted=()
for package in grain array_record ml_collections portpicker; do
  v=$(version "$package")
  wanted+=("$package${v:+==$v}")
done
rm -rf .whl
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl "${wanted[@]}"
ls .whl
