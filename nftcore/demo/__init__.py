"""The embedded demo world: procedurally generated editing tasks with exact ground truth and a programmatic judge.

It lets the whole Edit-R1 loop (pretrain, rollouts, reward, NFT update) run on a CPU in minutes with no files.

- `world`: scenes of coloured shapes, `render`, `random_task` (recolour / remove / move), `DemoDataset` (items
  shaped like the real dataset's, with `sample_id`, `prompt`, `requirement`), and the grammar-sized `tokenize`.
- `verifier`: `verify(edited, tasks) -> [B]` in [0, 1], dense, against the ground-truth target.
- `model`: `DemoPolicy`, the tiny pixel-patch FLUX MMDiT + text encoder the demo trains, and its shipped base
  checkpoint (`DemoPolicy.from_pretrained()`); `pretrain` (`python -m nftcore.demo.pretrain`) makes that checkpoint.
- `family`: `DemoFamily`, the demo as the trainer's policy family (model.family = 'demo'), and `DemoReward`, the
  verifier as a reward callable.
- `showcase` and `plots`: what `python -m nftcore.train` adds around a demo run (base and final evaluation,
  reward_curve.png, before_after.png).

The trainer imports this package (for `DemoFamily`); nothing here imports the trainer.
"""

from nftcore.demo.model import DemoConfig, DemoPolicy, DemoTextEncoder, pack_images, select_conditioning, unpack_images
from nftcore.demo.verifier import score_components, verify, verify_images
from nftcore.demo.world import (
    COLORS,
    DIRECTIONS,
    EDITS,
    MAX_TOKENS,
    PAD_ID,
    SHAPES,
    VOCAB,
    DemoDataset,
    DemoSample,
    EditTask,
    Scene,
    SceneObject,
    detokenize,
    random_task,
    render,
    stack_images,
    tokenize,
    tokenize_batch,
)

__all__ = [
    "COLORS",
    "DIRECTIONS",
    "EDITS",
    "MAX_TOKENS",
    "PAD_ID",
    "SHAPES",
    "VOCAB",
    "DemoConfig",
    "DemoDataset",
    "DemoPolicy",
    "DemoSample",
    "DemoTextEncoder",
    "EditTask",
    "Scene",
    "SceneObject",
    "detokenize",
    "pack_images",
    "random_task",
    "render",
    "score_components",
    "select_conditioning",
    "stack_images",
    "tokenize",
    "tokenize_batch",
    "unpack_images",
    "verify",
    "verify_images",
]
