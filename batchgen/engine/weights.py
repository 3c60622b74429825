"""What goes into the weights beyond the checkpoint: quantization on load (``model.quantization``)
and a LoRA adapter over them (``model.adapter``), each through its optional library.

Invariant: bitsandbytes, torchao and peft (the ``quant`` and ``lora`` extras) are imported only
when their setting is used (``config_checks.check_model`` has found them installed by then); a
model comes back where ``from_pretrained`` placed it, never moved or cast afterwards.
"""

from __future__ import annotations

import warnings


def quantization_config(name: str | None, dtype: str):
    """transformers' quantization config for ``model.quantization`` (None for none), computing
    in ``dtype`` where the method lets one choose.

    ``bnb-4bit`` is NF4 (the QLoRA format); ``int8`` is torchao's weight-only int8, which keeps
    activations in ``dtype``.
    """
    if name is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if name == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def apply_adapter(model, folder: str, merge: bool):
    """``model`` with the peft adapter in ``folder`` over it: merged into the weights (decoding
    as fast as the base), or kept apart in peft's LoRA layers.

    Either way a transformers model comes back, not peft's wrapper: ``PeftModel.generate`` runs
    the base model's ``generate`` under its own generation config, and would not see the one
    batchgen's engines set on their copy of the model.
    """
    from peft import PeftModel

    with warnings.catch_warnings():
        # peft asks transformers 5 for an attribute under its old name; nothing to act on.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        adapted = PeftModel.from_pretrained(model, folder)
    return adapted.merge_and_unload() if merge else adapted.get_base_model()
