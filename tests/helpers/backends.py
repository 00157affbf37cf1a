"""The environment flags that pick an op's backend (nftcore.ops.dispatch, the native GEMM switch): the `env` fixture
of tests/conftest.py clears them, and tests that start a subprocess leave them out of its environment."""

BACKEND_FLAGS = ("NFTCORE_DISABLE_TRITON", "NFTCORE_FORCE_TRITON", "NFTCORE_DISABLE_NATIVE", "NFTCORE_NATIVE_GEMM")
