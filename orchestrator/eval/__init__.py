"""`longtrain eval`: did the long context take? Perplexity by position (`perplexity.py`) and passkey retrieval
(`passkey.py`) on models loaded through the checkpoint package (`models.py`), reported as tables, PNGs and JSON
(`report.py`). Forward-only, with the training model's own forward: no second model."""
