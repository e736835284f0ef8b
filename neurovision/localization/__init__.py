"""Concept localisation (Shen et al. 2024, Fig. 6): GradCAM maps of concepts on the brain."""
