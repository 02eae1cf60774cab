"""Pruning (`python -m llm.prune`, llm/prune/__main__.py): structured (a smaller dense model) or unstructured / 2:4
(weights zeroed), both ranked on calibration activations (calibrate.py). Recovery is distillation from the
original: `train.py --init-from PRUNED --teacher ORIGINAL` (llm/train/objectives/distill.py)."""
