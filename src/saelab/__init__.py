"""saelab: train, evaluate and diagnose sparse autoencoders against known ground truth.

Tensor naming convention used throughout: suffixes carry shapes.
  B = batch, D = input (hidden) dim, L = SAE latents (d_sae), F = true (ground-truth) features,
  K = active entries per sample, R = correlation rank.
"""

__version__ = "0.1.0"
