"""Evaluate HydraLM: `python evaluate.py eval=<task> ckpt_path=...` or `python evaluate.py eval=claims`."""

import hydra
from omegaconf import DictConfig

from hydralm.training.run_dirs import register_resolver, removed_on_early_failure

register_resolver()  # ${unique_dir:...} in conf/hydra/default.yaml


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydralm.eval.evaluate_job import evaluate

    with removed_on_early_failure():
        evaluate(cfg)


if __name__ == "__main__":
    main()
