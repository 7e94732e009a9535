"""Learned image retrieval: train, evaluate, export and serve embeddings."""
