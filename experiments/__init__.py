"""Scripts that reproduce the paper's tables and measure the code; none of them is library
code. Run them from the repository root as modules, `python -m experiments.<group>.<name>`
(`reproduce.py` also as a file): `speed` times training, evaluation, data preparation and
serving; `kernels` times and checks the Pallas kernels and counts what a GPU step launches;
`scale` sizes meshes and TPU slices compiled without them. `deviceless` and `hlo_kernels`,
here, serve more than one group. docs/experiments.md is the index.
"""
