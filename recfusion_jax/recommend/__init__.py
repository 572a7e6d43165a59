r"""Recommendations from a trained RecFusion: the inference library and the recommend CLI.

  python -m recfusion_jax.recommend --config configs/tiny.py --workdir RUN --users 3,7
  python -m recfusion_jax.recommend --export_dir RUN/export --liked 12,40,41 --format json

Modules: ``inference`` (the model in eval mode: ``Recommender``, ``ServingFunctions``),
``restore`` (a training workdir's checkpoint, read-only, onto shardings), ``service``
(recommendations from a model in this process; the exported counterpart is
``recfusion_jax.serving``), ``new_item`` (a new item's content from a text / image / feature
file), ``__main__`` (the CLI).
"""

from recfusion_jax.recommend.inference import (CONTENT_KEYS, USER_KEYS, Recommender,
                                               ServingFunctions, chunked, content_inputs,
                                               param_name, refresh_item_cache)

__all__ = ["CONTENT_KEYS", "USER_KEYS", "Recommender", "ServingFunctions", "chunked",
           "content_inputs", "param_name", "refresh_item_cache"]
