"""Loading a `BDGemmaModel` from a Megatron checkpoint alone (converted from HF or saved by the trainer).

    from megatron_bdgemma.checkpointing import load_model
    model = load_model("ckpt/dg")          # at the current TP / EP / PP layout; 1 process if none is set up

The checkpoint must record its model config (`extra["model_config"]`, see `model_config_to_dict`).
"""

from megatron_bdgemma.conversion.megatron_checkpoint import load_model, model_config_from_dict, model_config_to_dict

__all__ = ["load_model", "model_config_from_dict", "model_config_to_dict"]
