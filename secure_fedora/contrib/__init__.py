"""Drop-in plug-ins: every module in this package is imported on the first registry lookup.

A new federated method is one module here that registers its class: a
:class:`~secure_fedora.algorithms.methods.FederatedMethod` implementing the contract of
:mod:`secure_fedora.algorithms.contract` (server half ``configure``/``aggregate``, client half
``client_update``; optional setup, evaluation and finalize exchanges; ``releases(cfg)`` for
what its clients release under DP), for example::

    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.registry import METHODS

    @METHODS.register("fedavg_nofinetune")
    class FedAvgNoFinetune(FedAvg):  # fine-tunes only if it declares finetunes = True
        pass

after which ``methods = ["fedavg_nofinetune"]`` is a valid config and runs in process with
or without DP and envelopes. A factory ``(ctx, cfg) -> method`` may be registered instead;
under DP it must name its class as ``factory.algorithm`` (its releases, the reply entries
and the assumptions results.json states are read from it; building a class declaring others
is refused).
A class attribute ``params`` (a pydantic model) validates ``[baselines.<name>]``.
"""
