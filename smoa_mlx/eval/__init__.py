"""Evaluation apart from the core: BIG-bench task data (:mod:`.bigbench`) and multiple-choice scoring by
log-likelihood (:mod:`.choice_eval`), used by ``scripts/compare.py``."""
