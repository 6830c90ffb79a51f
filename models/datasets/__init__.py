"""Dataset loaders: real logs to per-user EventSeq."""
