"""Encoding models: features -> neural sites (Subramaniam et al., ICML 2024)."""
