"""The authors' evaluation code against pka_jax's protocol on a small generated dataset:
`compare.py` runs in an environment with the authors' code, `pka_side` in pka_jax's
(docs/authors_protocol.md)."""
