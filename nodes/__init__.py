"""ComfyUI glue: each module declares one node family; this file collects their mappings."""
from __future__ import annotations

from . import edges, evaluation, faces, host, identity, train, train_options, widget_layouts
from ..sefi_core.console import guard_logger

host.register_model_folder(host.IDENTITY_FOLDER, host.IDENTITY_EXTENSIONS)
for _logger in (train.log, faces.log, evaluation.log):  # the host writes log lines with strict errors
    guard_logger(_logger)

NODE_CLASS_MAPPINGS: dict[str, type] = {**faces.NODE_CLASS_MAPPINGS, **identity.NODE_CLASS_MAPPINGS,
                                        **train.NODE_CLASS_MAPPINGS, **train_options.NODE_CLASS_MAPPINGS,
                                        **evaluation.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {**faces.NODE_DISPLAY_NAME_MAPPINGS,
                                              **identity.NODE_DISPLAY_NAME_MAPPINGS,
                                              **train.NODE_DISPLAY_NAME_MAPPINGS,
                                              **train_options.NODE_DISPLAY_NAME_MAPPINGS,
                                              **evaluation.NODE_DISPLAY_NAME_MAPPINGS}


def _refuse_stale_layouts(json_data: dict) -> dict:
    return widget_layouts.refuse_stale_layouts(json_data, NODE_CLASS_MAPPINGS, train_options.OPTION_INPUTS,
                                               NODE_DISPLAY_NAME_MAPPINGS)


def _normalise_booleans(json_data: dict) -> dict:
    return edges.normalise_prompt_booleans(json_data, NODE_CLASS_MAPPINGS)


# the values as sent: the layout check first (a shifted true/false is evidence), then the booleans' spelling
host.add_prompt_handler(_refuse_stale_layouts)
host.add_prompt_handler(_normalise_booleans)
