"""Check this machine before training on it: ``revseg-doctor`` (see :mod:`revseg.cli.doctor`)."""

from revseg.cli.doctor import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
