"""nftcore: DiffusionNFT (Edit-R1) post-training for instruction-based image-editing flow transformers.

Start at README.md; what is computed is in docs/ALGORITHM.md, how the package is built in docs/DESIGN.md.
"""

__version__ = "0.1.0"
