"""Conformational landscape VAE (consensus poses + CTF): dataset, model, training, analysis."""
