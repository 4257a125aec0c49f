"""The model: its frozen config, the SASRec encoder, attention and position schemes (PKA's
kernels among them), hashed dropout and model FLOPs."""
