"""Weight and activation sparsity, one idea per module (after torchao's sparsity package):

  patterns      which weights a mask may remove together (N:M, blocks, channels, ...), one class each
  criteria      scores that need gradients or reconstruction (Taylor, Fisher, SparseGPT)
  masks         masks as parametrizations of a projection's weight: the sparsity invariant
  modes         how masks move during distillation (fixed, dynamic, learnable)
  permutation   channel permutation before N:M pruning
  structured    patterns across projections (MLP channels, head groups) and shrinking them
  packing       the packed N:M format
  spec          what a sparse model dir holds (sparsity.json): pattern, masks, thresholds, heads
  calibration   the teacher's input statistics behind Wanda
  pruning       a model's masks from a criterion under a pattern (what the prune stage calls)
  activations   activation sparsity: calibrated input thresholds (TEAL-style)
  attention     attention sparsity's mechanism: the registered attention function, streaming KV heads
                (sink + window), and the probe and gates a forward may be given
  head_selection  which KV heads stream (by attention mass, or by trained gates) and the KV bytes saved

Each kind owns its config section, in a module of its own that loads no torch (the config is checked
before torch loads): prune_config (`prune`), masks_config (`train.masks`), activations_config
(`activations`), attention_config (`attention`). distill.config composes them; nothing here imports it.
"""
