"""Linear probes on frozen image features of a face benchmark:

    python eval/linear_probe.py ckpt=CKPT benchmark=rafdb benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and plots. Configuration: conf/eval_linear_probe.yaml
(the evaluation node conf/eval/default.yaml + conf/protocol/linear_probe.yaml, whose settings
are `protocols.linear_probe.*`, e.g. protocols.linear_probe.max_train=3000; the old `probe.*`,
`train_split`, `val_split`, `max_train` and `max_val` fail naming them).
"""

from flip.cli.evaluate import linear_probe

if __name__ == "__main__":
    linear_probe()
