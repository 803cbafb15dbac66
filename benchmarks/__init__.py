"""flaxseg benchmarks: throughput / MFU / scaling suite and the PyTorch peer comparison.

`python -m benchmarks.throughput --quick` and `python benchmarks/compare_torch.py`;
see benchmarks/README.md. flaxseg never imports this package.
"""
