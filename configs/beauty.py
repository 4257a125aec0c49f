"""Amazon Beauty (5-core): every model with the authors' tuned hyper-parameters
(docs/design.md §2).

  python -m pka_jax.main --config=configs/beauty.py              # PKA
  python -m pka_jax.main --config=configs/beauty.py:model=sasrec
"""

from configs import default

# Every best configuration in the authors' logs: maxlen 128, dropout 0.3, one head.
_SHARED = {'maxlen': 128, 'dropout': 0.3, 'num_heads': 1}

PER_MODEL = {
    'pka': {'num_blocks': 2, 'hidden_units': 128, 'learning_rate': 3e-4, 'batch_size': 128,
            **_SHARED},
    'sasrec': {'num_blocks': 3, 'hidden_units': 128, 'learning_rate': 3e-4, 'batch_size': 256,
               **_SHARED},
    'nope': {'num_blocks': 2, 'hidden_units': 256, 'learning_rate': 3e-4, 'batch_size': 128,
             **_SHARED},
    'rope': {'num_blocks': 2, 'hidden_units': 64, 'learning_rate': 1e-3, 'batch_size': 256,
             **_SHARED},
    'cope': {'num_blocks': 1, 'hidden_units': 128, 'learning_rate': 3e-4, 'batch_size': 256,
             **_SHARED},
    # untuned: ALL-APE has no published tuning; SASRec's beauty values.
    'all_ape': {'num_blocks': 3, 'hidden_units': 128, 'learning_rate': 3e-4, 'batch_size': 256,
                **_SHARED},
}


def get_config(arg=None):
  return default.for_dataset('beauty', arg, PER_MODEL)
