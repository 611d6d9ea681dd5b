"""Check a BraTS submission folder: ``revseg-check-submission ...`` (see
:mod:`revseg.cli.check_submission`)."""

from revseg.cli.check_submission import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
