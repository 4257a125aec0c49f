"""pka_jax: positional kernel attention for next-item recommendation, in JAX/Flax."""
