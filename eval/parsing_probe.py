"""The parsing probe (per-token linear classifier) on a frozen ViT image tower:

    python eval/parsing_probe.py ckpt=CKPT benchmark=lapa benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json (F1 per class, mean F1 over the foreground classes, mIoU), OUT/report.md
and parsing_examples.png. Configuration: conf/eval_parsing_probe.yaml (the evaluation node
conf/eval/default.yaml + conf/protocol/parsing_probe.yaml, whose settings are
`protocols.parsing_probe.*`, e.g. protocols.parsing_probe.blocks=[4,8,final]).
"""

from flip.cli.evaluate import parsing_probe

if __name__ == "__main__":
    parsing_probe()
