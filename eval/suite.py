"""Every model of a suite on every benchmark, one leaderboard:

    python eval/suite.py suite=faces_core suite.data_root=/data suite.models.0.ckpt=CKPT output_dir=OUT
    python eval/suite.py --compare OUT1/leaderboard.csv OUT2/leaderboard.csv

Writes OUT/leaderboard.md, .csv and .png and one folder per cell under OUT/cells/; a rerun with
the same output_dir skips the cells already done. Configuration: conf/eval_suite.yaml and
conf/suite/<name>.yaml (docs/evaluation.md, "Suites and leaderboards").
"""

from flip.cli.suite import main

if __name__ == "__main__":
    main()
