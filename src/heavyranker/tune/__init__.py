"""`heavyranker tune`: hyperparameter search on Optuna, each trial a training run (study.py), the search space
a YAML of dotted config paths (space.py), and the study's report (report.py). A floor above train and eval:
train knows nothing of the tuner (it takes an on_evaluation callback)."""
