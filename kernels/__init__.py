"""Triton kernels, their autograd Functions and PyTorch references of the same math.

No transformers imports here: every op takes plain tensors."""
