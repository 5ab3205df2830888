"""The token probe (FLIP's and FaRL's attribute head) on a frozen ViT image tower:

    python eval/token_probe.py ckpt=CKPT benchmark=celeba benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json, OUT/report.md and plots. Configuration: conf/eval_token_probe.yaml
(the evaluation node conf/eval/default.yaml + conf/protocol/token_probe.yaml, whose settings
are `protocols.token_probe.*`, e.g. protocols.token_probe.head=facer or
protocols.token_probe.selection=test_as_published).
"""

from flip.cli.evaluate import token_probe

if __name__ == "__main__":
    token_probe()
