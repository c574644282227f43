"""Diffusion Attribution Explorer: the engine library (no gradio outside explorer.web)."""
