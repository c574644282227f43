"""Offline half of the explorer: train a DDPM and its feature classifier, featurize, evaluate."""
