"""Train HydraLM: `python train.py [group=option ...] [key=value ...]` (see README.md and docs/training.md)."""

from typing import Optional

import hydra
from omegaconf import DictConfig

from hydralm.training.run_dirs import register_resolver, removed_on_early_failure

register_resolver()  # ${unique_dir:...} in conf/hydra/default.yaml


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    from hydralm.training.pipeline import optimized_metric, train

    with removed_on_early_failure():
        metrics, _ = train(cfg)
    return optimized_metric(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
