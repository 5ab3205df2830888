"""The landmark probe (per-token heatmaps, soft-argmax) on a frozen ViT image tower:

    python eval/landmark_probe.py ckpt=CKPT benchmark=wflw benchmark.root=DIR output_dir=OUT

Writes OUT/metrics.json (NME with the benchmark's normaliser, failure rate and AUC, NME per
point), OUT/report.md and landmark_examples.png. Configuration: conf/eval_landmark_probe.yaml
(the evaluation node conf/eval/default.yaml + conf/protocol/landmark_probe.yaml, whose settings
are `protocols.landmark_probe.*`).
"""

from flip.cli.evaluate import landmark_probe

if __name__ == "__main__":
    landmark_probe()
