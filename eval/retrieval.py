"""Image-text retrieval on a captioned benchmark:

    python eval/retrieval.py ckpt=CKPT benchmark=faceshapes output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and plots. Configuration: conf/eval_retrieval.yaml
(the evaluation node conf/eval/default.yaml + conf/protocol/retrieval.yaml).
"""

from flip.cli.evaluate import retrieval

if __name__ == "__main__":
    retrieval()
