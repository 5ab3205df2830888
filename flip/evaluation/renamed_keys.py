"""Evaluation keys that moved when evaluation became one benchmark + protocols schema.

Old keys on the command line are translated (flip.config.rename_overrides, with a warning
naming the new key); in a config file they fail naming it (flip.config.reject_renamed_keys).
A new key written `~key` stands for an old on/off switch: `old=false` removes that node.
"""

from __future__ import annotations

# train.py's `eval` node: the FaceShapes benchmark was merged into it and the probe had a node
# of its own; `eval.split`, `eval.batch_size`, `eval.num_workers`, `eval.test_shards` and
# `eval.during_training.*` keep their names
TRAIN_EVAL_KEYS: dict[str, str] = {
    "eval.linear_probe.enabled": "~eval.protocols.linear_probe",
    "eval.linear_probe": "eval.protocols.linear_probe",
    "eval.train_split": "eval.protocols.linear_probe.train_split",
    "eval.val_split": "eval.protocols.linear_probe.val_split",
    **{
        f"eval.{key}": f"eval.benchmark.{key}"
        for key in ("root", "name", "reader", "test_split", "templates", "binary", "multiclass", "classes")
    },
}

# eval/linear_probe.py: the probe's settings were `probe.*` and four top-level keys
EVAL_SCRIPT_KEYS: dict[str, str] = {
    "probe": "protocols.linear_probe",
    **{key: f"protocols.linear_probe.{key}" for key in ("train_split", "val_split", "max_train", "max_val")},
}
