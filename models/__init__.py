"""The next-action models: encoding, Transformer, training, evaluation, baselines."""
