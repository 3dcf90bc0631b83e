"""Offline inference: embedding, index folders, the fused classifier, predict, evaluate, queries, DDP parts."""
