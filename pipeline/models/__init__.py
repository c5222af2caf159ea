"""The models: the registry (registry.py), shared layer helpers (layers.py), the course's conv-net
arithmetic (arithmetic.py), and one module per model family."""
