"""Training with PyTorch Lightning; the only sub-package that imports Lightning."""
