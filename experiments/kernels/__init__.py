"""The GPU's side of the step: each Pallas kernel timed against its XLA path and checked
against it on the device (`benchmark --kernel=attention|layer_norm|ffn|loss`), the fused
attention paths checked against the plain one (`attention_check`), and the kernels an H100 or
H200 would launch for a config's train step, counted without a GPU (`gpu_kernels`).
"""
