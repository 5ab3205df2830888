"""Train a FLIP model: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

from flip.cli.train import train

if __name__ == "__main__":
    train()
