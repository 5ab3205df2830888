"""Fine-tune an image tower and a head: `python finetune.py task=... benchmark=...` (conf/finetune.yaml)."""

from flip.cli.finetune import finetune

if __name__ == "__main__":
    finetune()
