"""Zero-shot evaluation of a model on a face benchmark:

    python eval/zeroshot.py ckpt=CKPT benchmark=celeba benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and plots. Configuration: conf/eval_zeroshot.yaml
(the evaluation node conf/eval/default.yaml + conf/protocol/zeroshot.yaml); the prompts are
the benchmark's (conf/benchmark/<name>.yaml).
"""

from flip.cli.evaluate import zeroshot

if __name__ == "__main__":
    zeroshot()
