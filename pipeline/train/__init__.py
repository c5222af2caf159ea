"""Training one registry model: input pipeline (inputs.py), optimizer (optimizers.py), callbacks
(callbacks.py), checkpoint and resume (checkpoints.py), and the loop that ties them (loop.py)."""
