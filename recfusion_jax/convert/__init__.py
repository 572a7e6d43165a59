"""Import Hugging Face BERT / ViT / CLIP checkpoints into the unified ContentEncoder.

  python -m recfusion_jax.convert --hf PATH [--hf PATH ...] --out DIR

Library entry points: ``encoder_config_from_hf`` (config.json -> encoder config),
``import_hf_checkpoint`` (tensors -> an existing encoder), ``convert_hf`` (both),
``save_converted`` (Orbax + JSON + tokenizer) and ``load_pretrained_encoder`` (the training
config's ``init_from``). See docs/PRETRAINED.md for the mapping rules.
"""

from recfusion_jax.convert.checkpoint import Converted, LoadReport, convert_hf, \
    load_encoder_config, load_pretrained_encoder, save_converted
from recfusion_jax.convert.hf import HFCheckpoint, Tower, encoder_config_from_hf, \
    read_hf_checkpoint
from recfusion_jax.convert.mapping import ConversionReport, import_hf_checkpoint

__all__ = [
    "ConversionReport", "Converted", "HFCheckpoint", "LoadReport", "Tower", "convert_hf",
    "encoder_config_from_hf", "import_hf_checkpoint", "load_encoder_config",
    "load_pretrained_encoder", "read_hf_checkpoint", "save_converted",
]
