"""Cdiscount product classification and similar-product retrieval.

Sub-packages by role: ``data`` (read BSON, decode, categories, datasets, generated data), ``model`` (the
network, its config, runtime and exported model file), ``train`` (the only user of Lightning), ``infer``
(embedding, index folders, fused classification, predict, evaluate, queries, DDP parts; never imports
``train``), ``serve`` (the HTTP app and its page).
The FAISS layer is the separate top-level package ``index`` (numpy + faiss only).
"""
