"""Real-model activations: a hooked local LM on a corpus (`hooked_lm`, `text`, `sources`), on-disk
caches (`cache`) and users' own activation files (`files`).

Every source implements `saelab.data.ActivationSource`; `saelab.data.open_data` chooses and opens
them from a `DataSpec`, so nothing here knows about training or metrics.
"""
