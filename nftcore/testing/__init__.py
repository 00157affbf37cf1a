"""What the test suite and the benchmarks share: tiny random models built offline and reference implementations.

`tests/` and `bench/` may not import each other (tests/test_layout.py), so what both need lives here:

- `tiny_judge`: a tiny random Qwen2.5-VL judge with the real Qwen2 vocabulary, random images;
- `tiny_pipelines`: tiny random Qwen-Image-Edit(-Plus) and FLUX.1-Kontext diffusers pipeline folders;
- `reference_judge`: transformers' own way of scoring an edit (the oracle of `MLLMScorer`, the scorer benchmark's
  baseline);
- `reference_epoch`: the official-style Edit-R1 / DiffusionNFT epoch (bench/bench_epoch.py's baseline, checked
  against the trainer by tests/test_reference_epoch.py);
- `memory`: the peak of live torch tensor bytes while a function runs.

Nothing else in nftcore imports this package, and importing it imports nothing: each module pulls in its own heavy
dependencies (transformers, diffusers, peft) when it is imported.

See docs/DESIGN.md §8.
"""
