"""Sparse Mixture-of-Experts Llama (in progress): the routed feed-forward layer is in `routing.py`."""
