"""`python -m nftcore.reward` is `python -m nftcore.reward.server`: the scoring server."""

from .server import main

main()
