"""Training data: the Edit-R1 editing dataset (JSONL + images), its preprocessing and the epoch sampler.

- `edit_dataset`: `EditDataset` (eager validation, lazy images, `DatasetError` naming `path:line`), `EditSample`,
  `sample_key` (groups and bans key on the sample, not the instruction text), `epoch_indices` (the deterministic,
  rank-independent per-epoch draw), and the `center_crop_resize` / `to_tensor` / `to_pil` image helpers.
"""

from nftcore.data.edit_dataset import (
    DatasetError,
    EditDataset,
    EditRecord,
    EditSample,
    center_crop_resize,
    derive_seed,
    epoch_indices,
    sample_key,
    to_pil,
    to_tensor,
)

__all__ = [
    "DatasetError",
    "EditDataset",
    "EditRecord",
    "EditSample",
    "center_crop_resize",
    "derive_seed",
    "epoch_indices",
    "sample_key",
    "to_pil",
    "to_tensor",
]
