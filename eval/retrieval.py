"""Image-text retrieval on a captioned benchmark:

    python eval/retrieval.py ckpt=CKPT benchmark=faceshapes output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and plots; configuration: conf/eval_retrieval.yaml.
"""

from flip.cli.evaluate import retrieval

if __name__ == "__main__":
    retrieval()
