"""Predict the peak training memory of a config before training it: ``revseg-plan ...``.

See :mod:`revseg.cli.plan`.
"""

from revseg.cli.plan import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
