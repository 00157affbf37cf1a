"""Triton kernel sources, installed as `nftcore.kernels`.

Leaves of the house: each module takes tensors and returns tensors and knows no model, config or trainer. Nothing
outside `nftcore.ops` imports them; the ops import them lazily, so `TRITON_INTERPRET` can still be set first.
"""
