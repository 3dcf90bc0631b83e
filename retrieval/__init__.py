"""Cdiscount product classification and similar-product retrieval.

Sub-packages by role: ``data`` (read BSON, decode, categories, datasets, generated data), ``model`` (the
network, its config, runtime, exported model file and ONNX Runtime towers), ``train`` (fine-tuning with
Lightning), ``infer`` (``pipeline``: embedding parts, in one process or over Lightning DDP;
``indexdir``: index folders; ``scoring``: candidates, fusion, calibration, peers; then predict, evaluate and
queries; never imports ``train``), ``serve`` (the HTTP app and its page; imports Lightning nowhere: only
``infer.pipeline.distributed`` does, and only when more than one device or node is asked for).
The FAISS layer is the separate top-level package ``index`` (numpy + faiss only).
"""
