"""Test-wide JAX settings: eight CPU devices and strict rank promotion."""

import os

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')

# Tests compile the same small programs again and again; a persistent cache shares them.
jax.config.update('jax_compilation_cache_dir',
                  os.path.join(os.environ.get('TMPDIR', '/tmp'), 'pka_jax_tests_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
