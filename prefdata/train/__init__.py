"""The bundled preference trainer: DPO, RPO, rDPO, cDPO, IPO, SimPO and PRO on pipeline output.

``train(TrainConfig(...))`` from Python, ``prefdata train ...`` (``main(argv)``) from the shell.
Imports are lazy so that ``import prefdata.train`` does not load torch.
"""

__all__ = ["TrainConfig", "train", "main"]


def __getattr__(name):
    if name == "TrainConfig":
        from prefdata.train.config import TrainConfig

        return TrainConfig
    if name in ("train", "main"):
        from prefdata.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
