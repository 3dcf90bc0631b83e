"""The embedding pipeline: the network over numbered parts of products (one process or Lightning DDP),
kept in a PartStore."""
