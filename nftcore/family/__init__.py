"""What a policy family is, for every layer that builds or uses one.

The trainer runs one loop for FLUX.1-Kontext, Qwen-Image-Edit and the embedded demo; a *policy family* is what
differs between them (conditioning, sigma grid, decoding, datasets). This package is the contract only, low enough
that the families themselves (`nftcore.demo.family`, `nftcore.trainer.edit_family`) and the trainer all import it:

- `protocol`: the `PolicyFamily` protocol and the `model.dtype` names (`MODEL_DTYPES`);
- `conditioning`: rows of one editing conditioning and several concatenated, which every family's
  `index_conditioning` / `cat_conditioning` delegate to.

Where this sits among the layers: docs/DESIGN.md §1.
"""

from nftcore.family.conditioning import cat_conditioning, index_conditioning
from nftcore.family.protocol import MODEL_DTYPES, PolicyFamily

__all__ = ["MODEL_DTYPES", "PolicyFamily", "cat_conditioning", "index_conditioning"]
