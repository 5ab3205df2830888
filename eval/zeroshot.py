"""Zero-shot evaluation of a model on a face benchmark:

    python eval/zeroshot.py ckpt=CKPT benchmark=celeba benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and plots; configuration: conf/eval_zeroshot.yaml.
"""

from flip.cli.evaluate import zeroshot

if __name__ == "__main__":
    zeroshot()
