"""Demo stand-ins, not the product: tiny CLIP / VAE / unCLIP / LLM trained on the phantom so the chain runs on a laptop (``neurovision tiny ...``)."""
