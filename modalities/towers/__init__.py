"""Encoder towers: the PyTorch half of each modality, one module per kind.

``modalities/<kind>.py`` imports its tower module inside ``build_encoder`` only, so importing
the registry (and with it the configuration and the fast CLI commands) loads neither torch nor
transformers. Every module here may import torch at the top; nothing outside this package may
(``tests/test_architecture.py`` checks both).
"""
