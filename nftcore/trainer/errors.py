"""The training-time error that ends a run: the policy diverged (see `loop.MAX_NAN_STEPS` and §11.19)."""


class NonFiniteLossError(RuntimeError):
    """The policy's losses, gradients, rollouts or weights are not finite: the run cannot go on from these weights."""
