"""Predict NIfTI label maps with a trained run: ``revseg-predict ...``.

See :mod:`revseg.cli.predict`.
"""

from revseg.cli.predict import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
