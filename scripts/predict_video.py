"""Segment a video with a trained video run: DAVIS palette PNG masks, one per frame.

Usage::

    python scripts/predict_video.py run=outputs/<run> output=<folder> \\
        [sequence=<seq>] [root=<DAVIS root>] [predict.checkpoint=last] [predict.threshold=0.5]

The options are the keys of ``configs/predict_video.yaml``. Prints the IoU over all frames and
the DAVIS J mean against the sequence's masks, and writes them with the IoU of every frame to
``<output>/metrics.json``. Exits with status 2 and one line on stderr for a bad argument or file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from revseg.cli import exit_on_error, exit_with_help_if_asked
from revseg.config import compose_config


def main(argv: list[str]) -> int:
    from revseg.inference.video_prediction import predict_video
    from revseg.training.checkpoint import write_text_atomic

    cfg = compose_config("predict_video", argv)
    p = cfg.predict
    result = predict_video(
        cfg.run,
        cfg.output,
        root=cfg.root,
        sequence=cfg.sequence,
        checkpoint=str(p.checkpoint),
        device=str(p.device),
        threshold=p.threshold,
    )
    write_text_atomic(json.dumps(result, indent=2) + "\n", Path(cfg.output) / "metrics.json")
    m = result["metrics"]
    print(
        f"{result['sequence']}: {result['masks']} masks in {result['output']} "
        f"({result['seconds']:.1f} s); IoU mean {m['iou_mean']:.4f}, J mean {m['j_mean']:.4f}, "
        f"F mean {m['f_mean']:.4f}, J&F mean {m['jf_mean']:.4f}"
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    exit_with_help_if_asked(sys.argv[1:], __doc__)
    with exit_on_error():
        sys.exit(main(sys.argv[1:]))
