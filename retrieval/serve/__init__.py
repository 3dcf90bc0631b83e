"""HTTP serving: the FastAPI app over an opened index folder and its web page (nothing else)."""
