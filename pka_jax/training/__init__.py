"""Training: the train state, the pure step and its microbatches, the losses, the loop,
checkpoints and faults."""
