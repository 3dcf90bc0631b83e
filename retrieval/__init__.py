"""Cdiscount product classification and similar-product retrieval (learning side)."""
