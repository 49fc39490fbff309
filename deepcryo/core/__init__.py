"""Shared cryo-EM math of deepcryo (no Scipion imports): CTF, Fourier helpers, geometry, projection,
reconstruction, FSC, MRC/STAR I/O and simulation. Batched torch, float32, CPU or CUDA."""
