"""Fine-tuning: an image tower (frozen, fully trained or LoRA-adapted) and a task's head, trained
with pretraining's trainers, checkpoints and exact resume (`python finetune.py`, run.py)."""
