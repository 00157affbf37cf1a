"""The real editing families as a `PolicyFamily` (see `nftcore.family`): FLUX.1-Kontext (model.family = 'flux') and
Qwen-Image-Edit / -2509 Plus ('qwen_image'), on the Edit-R1 dataset at `data.path`.

The frozen parts and the policy `MMDiT` come from `nftcore.models.families` (loaded from the local diffusers
pipeline folder `model.path`, in `model.dtype`, all frozen: only the LoRA adapters the trainer adds are trained).
What the trainer fixes that the pipelines leave open is Edit-R1's training set-up:

- Square images. The dataset centre-crops sources to `sampling.resolution`; the edit is that size too, and the source
  enters the VAE at that size (Kontext without its preferred-resolution resize, Qwen with VAE area = resolution²),
  so at 512² both families see 1024 target + 1024 source tokens. One token grid for the whole run, hence one sigma
  grid: the pipeline's scheduler shift at the target's token count.
- Text lengths: T5 padded to 128 tokens (Kontext), at most 256 post-template tokens (Qwen), Edit-R1's values.
- Guidance: Kontext's distilled guidance embedding gets `sampling.guidance_scale` in rollouts and training forwards
  alike (2.5 in Edit-R1). True CFG (a negative-prompt branch) is not implemented: Edit-R1 trains without it.
- The Qwen variant (Edit or -2509 Plus) is the one the folder's model_index.json names.

The judge sees the dataset's square source and the decoded edit ([0, 1] tensors), with the row's `requirement`.
The real families have no built-in reward (`reward.backend` 'local' or 'server').

See docs/ALGORITHM.md §6 and §11.8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nftcore.config import TrainConfig
from nftcore.family import MODEL_DTYPES, cat_conditioning, index_conditioning
from nftcore.trainer.distributed import DistEnv, current_env

KONTEXT_T5_TOKENS = 128  # Edit-R1's max_sequence_length for Kontext (the pipeline default is 512)
QWEN_TEXT_TOKENS = 256  # Edit-R1's truncation of the Qwen2.5-VL hidden states after the template drop


def pipeline_folder(path: str) -> Path:
    """`model.path` as a local folder: the folder itself, or a Hugging Face id already in the local cache. Nothing is
    downloaded here: a 12B/20B download should not start silently on every rank of a training run."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not installed, not an id, not cached: one answer for all
        raise FileNotFoundError(
            f"model.path={path!r} is neither a local pipeline folder nor a Hugging Face id in the local cache "
            f"({type(err).__name__}); download it first (e.g. `hf download {path} --local-dir DIR`) and pass "
            "--model.path=DIR") from None


def _check_pipeline(cfg: TrainConfig, folder: Path):
    """Config and checkpoint must agree (family, guidance) before minutes of loading; errors name the config key.
    Returns the transformer's config."""
    from nftcore.models.checkpoint_io import read_config

    s = cfg.sampling
    arch = read_config(folder / "transformer")
    if arch.family != cfg.model.family:
        raise ValueError(f"{folder}: its transformer is a {arch.family!r} model, but model.family = "
                         f"{cfg.model.family!r}")
    if arch.family == "flux" and arch.guidance_embeds and s.guidance_scale is None:
        raise ValueError(f"{folder}: this FLUX transformer has a guidance embedding; set sampling.guidance_scale "
                         "(Edit-R1 trains Kontext at 2.5, the pipeline default is 3.5)")
    if arch.family == "flux" and not arch.guidance_embeds and s.guidance_scale is not None:
        raise ValueError(f"{folder}: this FLUX transformer has no guidance embedding; set sampling.guidance_scale "
                         f"to none (got {s.guidance_scale})")
    return arch


ENCODER_FOLDERS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "processor")
"""What a pipeline folder's conditioning depends on besides the config (the transformer is not among them)."""


def encoder_fingerprint(folder: Path) -> str:
    """A short hash of the encoder files' names and sizes: replacing the weights in one folder invalidates the
    conditioning cache without reading gigabytes."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for sub in ENCODER_FOLDERS:
        for path in sorted((folder / sub).rglob("*")) if (folder / sub).is_dir() else []:
            if path.is_file():
                h.update(f"{path.relative_to(folder).as_posix()}:{path.stat().st_size};".encode())
    return h.hexdigest()


def _datasets(cfg: TrainConfig):
    """(train, eval) Edit-R1 splits at the run's resolution; eval is None without test_metadata.jsonl, which is an
    error only when evaluation is on."""
    from nftcore.data import EditDataset

    if not cfg.data.path:
        raise ValueError(f"data.path must name the Edit-R1 dataset folder for model.family={cfg.model.family!r}")
    root = Path(cfg.data.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={cfg.data.path!r} is not a folder (expected images/ and "
                                "train_metadata.jsonl, test_metadata.jsonl)")
    on_error = "skip" if cfg.data.bad_lines == "skip" else "raise"
    train = EditDataset(root, "train", resolution=cfg.sampling.resolution, on_error=on_error)
    if not (root / "test_metadata.jsonl").is_file():
        if cfg.eval.every > 0:
            raise FileNotFoundError(f"{root / 'test_metadata.jsonl'} is missing but eval.every = {cfg.eval.every}; "
                                    "add the test split or set --eval.every=0")
        return train, None
    return train, EditDataset(root, "test", resolution=cfg.sampling.resolution, on_error=on_error)


class EditFamily:
    """FLUX.1-Kontext or Qwen-Image-Edit(-2509) around the policy `MMDiT`; `self.model` is the
    `nftcore.models.families` object (frozen encoders, VAE, schedule).

    `load_transformer=False` builds the frozen parts only (`python -m nftcore.precompute`). With
    data.cache_conditioning = 'disk' and a valid-looking cache entry for every row of both splits, the text encoders
    are not loaded (nor sharded): `conditioning` loads them, whole and on this rank only, if an entry turns out
    unusable after all. `env`: this rank's place (default: read from the process group, if any)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, *, load_transformer: bool = True,
                 env: DistEnv | None = None):
        from nftcore.models.families import KontextFamily, QwenImageEditFamily

        folder = pipeline_folder(cfg.model.path)
        self.env = env = env or current_env(device)
        dtype, size = MODEL_DTYPES[cfg.model.dtype], cfg.sampling.resolution
        arch = _check_pipeline(cfg, folder)  # before the weights: a bad config or dataset fails fast
        self.train_dataset, self.eval_dataset = _datasets(cfg)
        self.identity = self._identity(cfg, folder)
        text = not self._conditioning_cached(cfg)
        if cfg.model.family == "flux":
            self.model = KontextFamily.from_pretrained(folder, dtype=dtype, device=device, auto_resize=False,
                                                       max_sequence_length=KONTEXT_T5_TOKENS,
                                                       guidance=cfg.sampling.guidance_scale,
                                                       load_transformer=load_transformer, load_text_encoders=text)
        else:
            self.model = QwenImageEditFamily.from_pretrained(folder, dtype=dtype, device=device, vae_area=size * size,
                                                             max_sequence_length=QWEN_TEXT_TOKENS,
                                                             load_transformer=load_transformer,
                                                             load_text_encoders=text)
        self.transformer = self.model.transformer
        if self.transformer is not None:
            self.transformer.requires_grad_(False)
        self.text_encoders_sharded = text and cfg.parallel.shard_text_encoder and env.world_size > 1
        if self.text_encoders_sharded:
            from nftcore.trainer.inference_sharding import shard_text_encoders

            names = shard_text_encoders(self.model, device)
            if env.is_main:
                print(f"# text encoder(s) {', '.join(names)}: FSDP2-sharded over {env.world_size} ranks", flush=True)
        self.size = size
        self.grid = self.model.target_grid(size, size)  # (rows, cols) of target tokens
        self.in_channels = arch.in_channels

    def _identity(self, cfg: TrainConfig, folder: Path) -> dict[str, Any]:
        """What this run's conditioning depends on besides the row (the conditioning cache's key and check)."""
        identity = {"family": cfg.model.family, "model": str(folder.resolve()), "encoders": encoder_fingerprint(folder),
                    "dtype": cfg.model.dtype, "resolution": cfg.sampling.resolution}
        if cfg.model.family == "flux":
            identity.update(text_tokens=KONTEXT_T5_TOKENS, guidance=cfg.sampling.guidance_scale, auto_resize=False)
        else:
            from nftcore.models.families.qwen_image_edit import CONDITION_AREA, variant_of

            identity.update(text_tokens=QWEN_TEXT_TOKENS, variant=variant_of(folder),
                            vae_area=cfg.sampling.resolution ** 2, condition_area=CONDITION_AREA)
        return identity

    def conditioning_identity(self) -> dict[str, Any]:
        return dict(self.identity)

    def _conditioning_cached(self, cfg: TrainConfig) -> bool:
        """Whether the disk cache has an entry for every row of both splits (agreed over ranks)."""
        if cfg.data.cache_conditioning != "disk":
            return False
        from nftcore.trainer.conditioning_cache import cache_is_complete, directory_of, identity_of

        directory = directory_of(cfg)
        done = cache_is_complete(directory, identity_of(self), [self.train_dataset, self.eval_dataset], self.env)
        if done and self.env.is_main:
            rows = len(self.train_dataset) + (len(self.eval_dataset) if self.eval_dataset is not None else 0)
            print(f"# conditioning cache: all {rows} rows found in {directory}; the text encoder(s) are not loaded",
                  flush=True)
        return done

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.grid[0] * self.grid[1], self.in_channels

    def conditioning(self, samples):
        if not self.model.text_encoders_loaded:
            print(f"# conditioning cache: rank {self.env.rank} needs rows the cache lacks; loading the text encoder(s) "
                  "(whole, on this rank)", flush=True)
        with torch.no_grad():
            return self.model.conditioning([s.image for s in samples], [s.prompt for s in samples],
                                           height=self.size, width=self.size)

    def index_conditioning(self, cond, index: torch.Tensor):
        return index_conditioning(cond, index)

    def cat_conditioning(self, conds):
        return cat_conditioning(conds)

    def velocity_fn(self, cond, transformer: nn.Module | None = None):
        from nftcore.models import edit_velocity_fn

        return edit_velocity_fn(transformer if transformer is not None else self.transformer, cond)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return self.model.sigmas(num_steps, self.grid)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents, self.grid)

    def source_images(self, samples) -> torch.Tensor:
        from nftcore.data import to_tensor

        return torch.stack([to_tensor(s.image) for s in samples])

    def reward_metadata(self, sample) -> dict[str, Any]:
        return {**sample.metadata, "prompt": sample.prompt, "requirement": sample.requirement,
                "sample_id": sample.sample_id}

    def default_reward(self):
        return None

    def target_images(self, samples):
        return None
