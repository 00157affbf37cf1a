"""`build_family`: the policy family the config names. What a family is: `nftcore.family.PolicyFamily`; the
families: `nftcore.demo.family.DemoFamily` ('demo') and `edit_family.EditFamily` (FLUX.1-Kontext 'flux',
Qwen-Image-Edit 'qwen_image': VAE + text encoders around `nftcore.models.MMDiT`, the Edit-R1 dataset).

Where families sit among the layers: docs/DESIGN.md §1.
"""

from __future__ import annotations

import torch

from nftcore.config import TrainConfig
from nftcore.demo.family import DemoFamily
from nftcore.family import PolicyFamily
from nftcore.trainer.distributed import DistEnv


def build_family(cfg: TrainConfig, device: torch.device, *, load_transformer: bool = True,
                 env: DistEnv | None = None) -> PolicyFamily:
    """The policy family named by `cfg.model.family`. With `data.verify_images`, every image of both splits is
    decoded now (`EditDataset.verify_images`: 'skip' drops unreadable ones like bad lines, 'error' stops), on every
    rank alike, so all ranks keep the same rows; the demo's procedural datasets have no files to verify.

    `load_transformer=False` leaves out the policy transformer where it is big (the real families; the demo's is part
    of its tiny policy): `python -m nftcore.precompute` needs only the frozen encoders. `env`: this rank's place
    (default: read from the process group), for the real families' sharded text encoders and messages."""
    if cfg.model.family == "demo":
        family = DemoFamily(cfg, device)
    elif cfg.model.family in ("flux", "qwen_image"):
        from nftcore.trainer.edit_family import EditFamily

        # Keywords only when they are used: the plain call stays `EditFamily(cfg, device)` (tests stub that).
        options = {**({} if load_transformer else {"load_transformer": False}), **({} if env is None else {"env": env})}
        family = EditFamily(cfg, device, **options)
    else:
        raise ValueError(f"unknown model.family {cfg.model.family!r}; expected 'demo', 'flux' or 'qwen_image'")
    if cfg.data.verify_images:
        for dataset in (family.train_dataset, family.eval_dataset):
            verify = getattr(dataset, "verify_images", None)
            if callable(verify):
                verify()
    return family
