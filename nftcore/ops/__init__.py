"""The only door to nftcore's fused kernels: one public function per op, each with a PyTorch reference beside it.

Importing this package costs torch (and triton, when a kernel is first used) - nothing heavier.

Every op follows one pattern (public function, custom op, backend table, reference): docs/DESIGN.md §5.
"""

from .adaln import adaln, gated_adaln, gated_residual
from .attention import attention
from .checks import NonFiniteError
from .dispatch import Backend, last_backend, select_backend
from .gelu import gelu_tanh, gelu_tanh_
from .nft_loss import nft_loss
from .reference import NFTLossOutput
from .rms_norm import rms_norm
from .score_logits import score_logits

__all__ = ["Backend", "NFTLossOutput", "NonFiniteError", "adaln", "attention", "gated_adaln", "gated_residual",
           "gelu_tanh", "gelu_tanh_", "last_backend", "nft_loss", "rms_norm", "score_logits", "select_backend"]
