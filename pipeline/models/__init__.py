"""The models: every model's params class and the registry of models (params.py, no Keras), their
builders (registry.py), shared layer helpers (layers.py), the course's conv-net arithmetic
(arithmetic.py), and one module per model family."""
