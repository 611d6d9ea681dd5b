"""Train a revseg model: ``python train.py [group=option ...] [key=value ...]``.

The same command as ``revseg-train`` (:mod:`revseg.cli.train`); see README.md for examples.
"""

from revseg.cli.train import run

if __name__ == "__main__":
    run()
