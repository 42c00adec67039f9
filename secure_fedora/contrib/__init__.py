"""Drop-in plug-ins: every module in this package is imported on the first registry lookup.

A new federated method is one module here that registers a factory, for example::

    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.registry import METHODS

    @METHODS.register("fedavg_nofinetune")
    def build(ctx, cfg):
        return FedAvg(ctx, finetune_epochs=0)

after which ``methods = ["fedavg_nofinetune"]`` is a valid config.
"""
