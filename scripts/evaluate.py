"""Evaluate predicted label maps against the truth: ``revseg-evaluate ...``.

See :mod:`revseg.cli.evaluate`.
"""

from revseg.cli.evaluate import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
