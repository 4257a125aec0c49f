"""Default configuration: PKA (Toeplitz-Full, layer-wise) on the embedded synthetic dataset.

Dataset configs import this module, override fields and call `apply_variant` so that
`--config=configs/x.py:model=sasrec` selects a baseline. Every field is commented here.
"""

import ml_collections

# Position modes of each model the paper compares (docs/design.md §1, baselines).
MODEL_POSITIONS = {
    'pka': 'kernel',  # positional kernel attention (the paper's method)
    'sasrec': 'absolute',  # learned position embedding at the input
    'nope': 'none',  # no positional signal beyond the causal mask
    'all_ape': 'absolute_all',  # learned position embedding added to Q, K, V in every block
    'rope': 'rotary',  # rotary embeddings on Q and K
    'cope': 'contextual',  # contextual (CoPE-style) positions
}

KERNEL_FIELDS = ('kernel_q_side', 'kernel_k_side', 'kernel_v_side', 'share_toeplitz',
                  'share_full')
# The paper's PKA ablations (`:model=pka,kernel=NAME`), as values of KERNEL_FIELDS.
KERNEL_LAYOUTS = {
    'toeplitz_full': ('none', 'toeplitz', 'full', False, True),  # the best: layer-wise U, shared L
    'toeplitz_toeplitz': ('none', 'toeplitz', 'toeplitz', False, False),  # "ll", per block
    'full_toeplitz': ('none', 'full', 'toeplitz', False, True),  # "al": shared full U
    'toeplitz_full_shared': ('none', 'toeplitz', 'full', True, True),  # one U for all blocks
    # Where the kernel applies (our reading: Toeplitz on Q/K, full on V).
    'k_only': ('none', 'toeplitz', 'none', False, True),
    'v_only': ('none', 'none', 'full', False, True),
    'q_and_k': ('toeplitz', 'toeplitz', 'none', False, True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # ---- data ----
  config.dataset = 'synthetic'  # name in pka_jax.data.registry (or 'synthetic')
  config.data_dir = 'data'  # raw files live in data_dir/<dataset>/, prepared stores beside them
  config.q_valid = 0.95  # validation starts at this quantile of time (before the cap)
  config.q_test = 0.97  # test starts at this quantile of time (before the cap)
  config.max_eval = 50_000  # cap on validation interactions (docs/design.md §3)
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.num_users = 3000  # users generated
  config.synthetic.num_items = 400  # catalog size
  config.synthetic.min_length = 20  # shortest user history
  config.synthetic.max_length = 60  # longest user history
  config.synthetic.noise = 0.15  # probability that an item is a popularity draw, not the rule
  config.synthetic.seed = 0  # generator seed

  # ---- model (pka_jax.models.ModelConfig) ----
  config.model = 'pka'  # key of MODEL_POSITIONS; sets position_mode
  # none | absolute | absolute_all | rotary | contextual | kernel (set by `model`)
  config.position_mode = MODEL_POSITIONS['pka']
  config.maxlen = 128  # T: sequence length the model reads (left-padded)
  config.num_blocks = 3  # transformer blocks
  config.hidden_units = 128  # d
  config.num_heads = 1  # attention heads (d must be divisible)
  config.dropout = 0.3  # dropout on embeddings, attention weights and the feed-forward
  config.mask_padding_keys = True  # False reproduces the authors' code (only the future masked)
  config.kernel_k_side = 'toeplitz'  # PKA kernel on the keys: toeplitz|full|none
  config.kernel_v_side = 'full'  # PKA kernel on the values: toeplitz|full|none
  config.kernel_q_side = 'none'  # PKA kernel on the queries (ablation): toeplitz|full|none
  config.share_toeplitz = False  # one Toeplitz kernel for all blocks instead of one per block
  config.share_full = True  # one full kernel for all blocks (the paper's best) or one per block
  config.kernel_init_std = 0.02  # kernel off-diagonal entries start at |N(0, std)|
  # float32 | bfloat16: activations and matmuls; parameters, optimiser state, softmax and the
  # loss's accumulation stay float32. bfloat16 is for GPU and TPU (no faster on most CPUs).
  config.dtype = 'float32'
  # auto | plain | xla | cudnn | pallas. auto: cuDNN's fused attention on GPU for bfloat16,
  # else plain. xla/cudnn (jax.nn.dot_product_attention) run wherever the attention weights
  # see no dropout (evaluation, or dropout 0); training with dropout uses plain, and CoPE
  # always does. pallas (GPU only): as auto, but training with dropout runs one Triton kernel
  # a sequence and head, kernels and dropout inside (pka_jax/kernels/attention.py), where its
  # tiles fit (queries, keys and head size powers of two, at least 16); else plain.
  config.attention_impl = 'auto'
  # hash: keep-masks from a keyed integer hash of the element index (pka_jax/model/dropout.py), 50x
  # cheaper than jax.random's bits on CPU; jax: flax's jax.random.bernoulli masks.
  config.dropout_impl = 'hash'
  # xla | pallas. pallas (GPU only): in training, every LayerNorm as one Triton kernel
  # forward and one backward (pka_jax/kernels/layer_norm.py) where rows come in blocks of 16
  # to 64 and the width is a power of two of at least 16; flax's elsewhere and in evaluation,
  # serving and export. The same parameters and LayerNorm, to float rounding.
  config.layer_norm_impl = 'xla'
  # xla | pallas. pallas (GPU only): in training, each block's second half (the attention's
  # output projection, the residual, LayerNorm, feed-forward, both dropouts and the padding
  # mask) as one Triton kernel forward and one backward (pka_jax/kernels/ffn.py) where rows
  # come in blocks of 16 or 32 and the width is a power of two from 16 to 128; the XLA path
  # elsewhere (microbatches included) and in evaluation, serving and export. The same
  # parameters, masks and function, to float rounding.
  config.ffn_impl = 'xla'

  # ---- training ----
  config.loss = 'ce'  # ce: full-catalog softmax cross-entropy; bce: sampled negatives
  # ce over items in blocks of this size (exact; memory of one chunk of rows' logits over a
  # block instead of all B·T × N, a third more loss FLOPs: the logits recomputed backward);
  # 0: chunks of rows over the whole catalog at once (ce_chunk_rows).
  config.ce_block_size = 0
  # With ce_block_size 0: rows per chunk of the fused loss (0: chunk logits of ~8 MB on CPU,
  # ~1 GB on accelerators). Exact whatever the value; a speed and memory setting.
  config.ce_chunk_rows = 0
  # xla | pallas. pallas: the cross-entropy as Triton kernels that never write the logits
  # (pka_jax/kernels/loss.py; GPU only, one device's table, ce_block_size and ce_chunk_rows
  # unused). The same loss; which is faster is for a GPU profile to say.
  config.ce_impl = 'xla'
  config.learning_rate = 1e-3  # Adam, constant
  config.adam_b1 = 0.9  # Adam beta1
  config.adam_b2 = 0.98  # Adam beta2
  config.batch_size = 256  # sequences per step, over all devices
  # Gradient accumulated over this many slices of each step's batch (same gradient); 0: auto,
  # slices of ~2,048 positions per device on CPU (they stay in cache), none on accelerators.
  # On one host with trim_windows, slices hold rows of similar length, each in the window its
  # longest row needs (pka_jax/training/microbatching.py).
  config.microbatches = 0
  # Windows cut to the columns their batch needs (a power of two): training batches to their
  # longest history, evaluation batches (of similar contexts) to their longest context. The
  # same outputs for fewer FLOPs where the model trims exactly: padding keys masked and no
  # query-side kernel, or the authors' visible padding keys where they are all one key
  # (SASRec, NoPE: windows then keep a padding column; encoder.Encoder); otherwise every
  # window is maxlen wide. Hashed dropout masks follow each element's place in the full-width
  # batch, so neither this nor `microbatches` changes a run, only its speed
  # (`dropout_impl='jax'` masks do change with both).
  config.trim_windows = True
  # Devices the item table's rows (and their Adam moments) are split over: the 'model' axis of
  # a (data, model) mesh of all devices. 1 replicates the table (data parallel only); a larger
  # catalog than one device holds needs more (pka_jax/sharding.py).
  config.mesh_model = 1
  config.max_epochs = 200  # hard limit on epochs
  config.patience = 10  # stop after this many validations without a better NDCG@10
  config.seed = 0  # parameters, dropout and data order
  # PRNG for parameters and dropout. 'rbg' draws bits with XLA's RngBitGenerator: on CPU a
  # model compiles ~5x faster than with 'threefry2x32' (~1 s per dropout site), and it is
  # faster on accelerators; 'threefry2x32' gives bits independent of backend and sharding.
  config.prng_impl = 'rbg'
  config.log_every_steps = 50  # train metrics written every this many steps
  config.checkpoint_every_steps = 0  # extra mid-epoch checkpoints (0: only after validation)
  # A validation that is neither a new best nor the last saves a checkpoint only this many
  # seconds after the last save, and never while one is still being written: an epoch on an
  # accelerator is shorter than a save. Work a crash loses is redone to the same end.
  config.checkpoint_interval_s = 60

  # ---- evaluation ----
  config.top_k = 10  # metrics at k
  # Evaluation steps scored per batch; 0: the backend's (config_check.eval_batch_size_for:
  # 512 on CPU, 4,096 on accelerators). The metrics do not depend on it.
  config.eval_batch_size = 0

  # ---- hyper-parameter search (python -m pka_jax.tune) ----
  # Config fields and the values a search tries (a nested field in a nested group, e.g.
  # search_space.synthetic.noise). The authors' space for every model (docs/design.md §2);
  # maxlen and num_heads stay as set. Datasets of long sessions search smaller batches. From
  # the command line: --config.search_space.dropout='(0.1, 0.2, 0.3)'.
  config.search_space = ml_collections.ConfigDict({
      'batch_size': (128, 256),
      'num_blocks': (1, 2, 3),
      'hidden_units': (64, 128, 256),
      'learning_rate': (3e-4, 1e-3),
      'dropout': (0.1, 0.3),
  })

  apply_variant(config, arg)
  return config


def for_dataset(dataset: str, arg: str | None, per_model: dict[str, dict],
                **fields) -> ml_collections.ConfigDict:
  """The default config on `dataset` with `fields` set, the model picked by `arg` and its
  hyper-parameters."""
  config = get_config()
  config.dataset = dataset
  config.update(fields)
  apply_variant(config, arg, per_model)
  return config


def apply_variant(
    config: ml_collections.ConfigDict,
    arg: str | None,
    per_model: dict[str, dict] | None = None,
) -> None:
  """Applies `model=NAME[,kernel=LAYOUT]` from `--config=file.py:model=NAME,kernel=LAYOUT`.

  `per_model[NAME]` holds that model's hyper-parameters for the dataset (docs/design.md §2); they
  are applied with the model, so `model=sasrec` on ml1m gets SASRec's tuned width and rate.
  `kernel=LAYOUT` (PKA only) picks one of the paper's ablations in KERNEL_LAYOUTS.
  """
  variant = dict(model=config.model)
  for item in (arg or '').split(',') if arg else ():
    key, sep, value = item.partition('=')
    if not sep or key not in ('model', 'kernel'):
      raise ValueError(f'Config variant {item!r}: expected model=NAME or kernel=LAYOUT')
    variant[key] = value
  model, kernel = variant['model'], variant.get('kernel')
  if model not in MODEL_POSITIONS:
    raise ValueError(f'Config variant model={model}: expected one of {sorted(MODEL_POSITIONS)}')
  config.model = model
  config.position_mode = MODEL_POSITIONS[model]
  config.update((per_model or {}).get(model, {}))
  if kernel is not None:
    if model != 'pka':
      raise ValueError(f'Config variant kernel={kernel} needs model=pka, not {model}')
    if kernel not in KERNEL_LAYOUTS:
      raise ValueError(f'Config variant kernel={kernel}: expected one of {sorted(KERNEL_LAYOUTS)}')
    config.update(dict(zip(KERNEL_FIELDS, KERNEL_LAYOUTS[kernel])))
