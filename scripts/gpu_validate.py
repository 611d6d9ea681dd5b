"""Validate revseg on the GPU at hand: ``revseg-gpu-validate``.

See :mod:`revseg.bench.gpu_validate`.
"""

from revseg.bench.gpu_validate import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
