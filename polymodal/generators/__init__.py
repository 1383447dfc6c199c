"""Generative parts: the diffusion process (`generators.diffusion`, independent of any network),
the KL autoencoder (`vae`), and the denoisers (`dit`, `unet`) that families compose."""
