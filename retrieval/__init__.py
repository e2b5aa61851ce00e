"""Retrieval: the two-level FAISS index, BM25 keyword search, fusion, reranking, KB management."""
