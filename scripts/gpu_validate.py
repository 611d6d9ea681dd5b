"""Validate revseg on the GPU at hand: ``revseg-gpu-validate`` (see :mod:`revseg.cli.gpu_validate`)."""

from revseg.cli.gpu_validate import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
