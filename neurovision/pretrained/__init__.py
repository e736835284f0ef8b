"""Frozen pretrained networks loaded from local paths: the CLIP / VAE teachers, the LLM, the unCLIP pipeline."""
