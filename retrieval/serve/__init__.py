"""Serving: embedding, index folders, the fused classifier, predict, evaluate, similar. Never imports ``train``."""
