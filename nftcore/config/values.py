"""Kept only for `from nftcore.config.values import toml_literal` (nftcore/trainer/run_folder.py); the TOML writer is
`nftcore.config.serialize.toml_literal`. Delete once that import points there."""

from nftcore.config.serialize import toml_literal

__all__ = ["toml_literal"]
