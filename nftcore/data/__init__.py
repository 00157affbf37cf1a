"""Training data: the Edit-R1 editing dataset (JSONL + images), its preprocessing and the epoch sampler.

- `edit_dataset`: `EditDataset` (eager validation, lazy images, `DatasetError` naming `path:line`; an image that
  cannot be decoded is an `ImageDecodeError`; `verify_images` decodes them all up front), `EditSample`,
  `sample_key` (groups and bans key on the sample, not the instruction text), `epoch_indices` (the deterministic,
  rank-independent per-epoch draw), `derive_seed` (the per-sample seeds), and the `center_crop_resize` /
  `to_tensor` / `to_pil` image helpers.
- `benchmarks`: the prompt lists `python -m nftcore.edit` reads (Edit-R1 splits, GEdit-Bench, ImgEdit).

See docs/ALGORITHM.md §5.2 (the epoch's draw), §6 (preprocessing) and §8 (seeding).
"""

from nftcore.data.edit_dataset import (
    IMAGE_FORMATS,
    DatasetError,
    EditDataset,
    EditRecord,
    EditSample,
    ImageDecodeError,
    center_crop_resize,
    derive_seed,
    epoch_indices,
    sample_key,
    to_pil,
    to_tensor,
)

__all__ = [
    "IMAGE_FORMATS",
    "DatasetError",
    "EditDataset",
    "EditRecord",
    "EditSample",
    "ImageDecodeError",
    "center_crop_resize",
    "derive_seed",
    "epoch_indices",
    "sample_key",
    "to_pil",
    "to_tensor",
]
