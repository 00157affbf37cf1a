"""nftcore: DiffusionNFT (Edit-R1) post-training for instruction-based image-editing flow transformers."""

__version__ = "0.1.0"
