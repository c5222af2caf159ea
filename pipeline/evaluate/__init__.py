"""Evaluating a trained model: scores and the gate (scores.py), pictures (pictures.py), TensorBoard views (tensorboard.py)."""
