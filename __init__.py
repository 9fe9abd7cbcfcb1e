"""SeFi-IDE for ComfyUI: learn an identity embedding from a few face photos and use it in any graph.

Registration only; the nodes live in nodes/, the method in sefi_core/.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
