"""``model.network.import: deqfusion.adapters.mutan.network``: block's VQANet with DEQ fusion for its answers.

bootstrap calls ``factory(engine)``.  It calls block's own network factory
(``block.models.networks.factory.factory``), which builds the ``VQANet`` of the options exactly as the
baseline does (same modules, same order, same seed, so everything before the answer fusion starts from
the same weights), and then, for ``model.network.deq.fusion: deq``:

1. replaces ``net.fusion`` -- the fusion ``VQANet.forward`` calls as ``logits = self.fusion([q, v])``,
   q (B, 4800) the self-attended skip-thought question, v (B, 4096) the two attended region glimpses --
   by a :class:`~deqfusion.adapters.mutan.head.DEQClassifier` with the same ``input_dims`` and
   ``output_dim`` (the Mutan that block built is dropped);
2. registers a forward hook on the network that adds the classifier's per-sample Jacobian term and
   solver statistics (``SAMPLE_KEYS``) to the output dict ``{'logits': ...}`` of that same forward.

With ``fusion: mutan`` the network is block's, unchanged.  Multi-GPU: block's factory wraps the net in
bootstrap's DataParallel; the swap is made on the wrapped module and the (B, 1) outputs are gathered
along the batch like the logits.
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from . import current_settings
from .head import DEQClassifier

__all__ = ["factory", "install_deq"]


def _add_deq_outputs(module: nn.Module, inputs: Any, output: Dict[str, Any]) -> Dict[str, Any]:
    if isinstance(output, dict) and isinstance(getattr(module, "fusion", None), DEQClassifier):
        output.update(module.fusion.pop_outputs())
    return output


def install_deq(vqa_net: nn.Module, settings) -> DEQClassifier:
    """Put DEQ fusion where ``vqa_net.fusion`` is (same input widths and answer count); returns it."""
    old = vqa_net.fusion
    input_dims, output_dim = getattr(old, "input_dims", None), getattr(old, "output_dim", None)
    if input_dims is None or output_dim is None:
        raise TypeError(f"the network's fusion {type(old).__name__} has no input_dims/output_dim: "
                        "model.network.classif.fusion must be one of block's fusions (mutan.yaml's is)")
    head = DEQClassifier(input_dims, output_dim, settings)
    vqa_net.fusion = head
    vqa_net.register_forward_hook(_add_deq_outputs)
    return head


def factory(engine=None):
    from block.models.networks import factory as block_networks
    from bootstrap.lib.logger import Logger

    settings = current_settings()
    net = block_networks.factory(engine)
    if not settings.is_deq:
        Logger()("deqfusion: model.network.deq.fusion is mutan: block's network, unchanged")
        return net
    vqa_net = net.module if isinstance(net, nn.DataParallel) else net
    replaced = type(vqa_net.fusion).__name__
    head = install_deq(vqa_net, settings)
    Logger()(f"deqfusion: DEQ fusion replaces the {replaced} answer fusion: {head.extra_repr()}")
    Logger().log_value("nb_params_fusion_deq", head.n_params, should_print=True)
    return net
