"""Deep micrograph defocus: CNN first guess + batched physics refinement of the 2D CTF (no Scipion imports).

Modules: :mod:`.psd` (the one PSD function), :mod:`.model` (CNNs), :mod:`.fit` (CTF fit and exhaustive
search), :mod:`.training_data` (simulated training PSDs), :mod:`.train`, :mod:`.predict`;
programs in :mod:`.__main__`.
"""
