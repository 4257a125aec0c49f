"""How fast the library runs on the machine at hand: a config's train step and evaluation
against the measured matmul peak (`benchmark`, with a profiler trace that `trace_breakdown`
splits by part of the model), the evaluation's host side (`eval_benchmark`), preparing a
dataset's store (`prepare_benchmark`) and recommendations from a trained workdir
(`recommend_throughput`).
"""
