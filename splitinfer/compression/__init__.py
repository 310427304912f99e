"""Model compression methods: each takes a model and data and returns the compressed model plus a recipe.

* :mod:`~splitinfer.compression.deep` — Deep Compression: magnitude pruning, trained k-means weight sharing,
  entropy-coded indices and sparse positions.
* :mod:`~splitinfer.compression.lowrank` — Tucker-2 (convolutions) and SVD (linear) factorization.
* :mod:`~splitinfer.compression.quantize` — ternary (TTQ), binary and uniform b-bit (mixed precision) weights.
* :mod:`~splitinfer.compression.policy` — the automated per-layer policy (low-rank keep fractions, bit widths).
* :mod:`~splitinfer.compression.coding` — how coded weights are stored (safetensors, hash-checked, decoded
  bit-exact), shared by every weight-sharing method.
* :mod:`~splitinfer.compression.layers` — the layers a method may touch, MACs, stored bytes, and the one
  distillation fine-tuning loop.
* :mod:`~splitinfer.compression.artifact` — a compressed model on disk (``plan compress --out DIR``): its
  weights (coded or not) and ``compression.json`` (structure, recipe, figures); how a bundle rebuilds it.

* :mod:`~splitinfer.compression.int8` — int8 post-training quantization of a head per segment (the bundle's
  int8 head).
* :mod:`~splitinfer.compression.prune` — stage-internal structured pruning of a head (one ratio, or one per
  layer) with distillation.
"""
