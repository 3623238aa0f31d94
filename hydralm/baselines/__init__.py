from hydralm.baselines.dense_transformer import DenseTransformer

__all__ = ["DenseTransformer"]
