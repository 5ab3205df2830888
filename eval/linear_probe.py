"""Linear probes on frozen image features of a face benchmark:

    python eval/linear_probe.py ckpt=CKPT benchmark=rafdb benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and plots; configuration: conf/eval_linear_probe.yaml.
"""

from flip.cli.evaluate import linear_probe

if __name__ == "__main__":
    linear_probe()
