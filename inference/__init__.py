"""Inference: sampling with a KV cache, and best-of-N answers picked by the preference head."""
