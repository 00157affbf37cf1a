"""The only door to nftcore's fused kernels: one public function per op, each with a PyTorch reference beside it.

Importing this package costs torch (and triton, when a kernel is first used) - nothing heavier.
"""

from .attention import attention
from .checks import NonFiniteError
from .dispatch import Backend, last_backend, select_backend
from .nft_loss import nft_loss
from .reference import NFTLossOutput
from .score_logits import score_logits

__all__ = ["Backend", "NFTLossOutput", "NonFiniteError", "attention", "last_backend", "nft_loss", "score_logits",
           "select_backend"]
