"""Face verification (LFW, CALFW, CPLFW) by the published 10-fold protocol:

    python eval/verification.py ckpt=CKPT benchmark=lfw benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and OUT/roc.png. Configuration: conf/eval_verification.yaml
(the evaluation node conf/eval/default.yaml + conf/protocol/verification.yaml).
"""

from flip.cli.evaluate import verification

if __name__ == "__main__":
    verification()
