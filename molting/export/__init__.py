"""Export: merge a LoRA adapter, write GGUF, quantize with llama.cpp.

``merge_adapter`` → ``write_gguf`` → ``quantize``, checked by ``molting.export.verify``;
or the adapter alone for llama.cpp, ``write_lora_gguf``. Each writes its output atomically.
``export_model`` (``molting.export.steps``) runs the whole path; ``molting export`` and
``molting run`` both call it.
"""

from molting.export.adapter import write_lora_gguf
from molting.export.gguf import write_gguf
from molting.export.merge import merge_adapter
from molting.export.quantize import QUANT_TYPES, quantize
from molting.export.steps import ExportResult, export_adapter_gguf, export_gguf, export_model

__all__ = [
    "QUANT_TYPES",
    "ExportResult",
    "export_adapter_gguf",
    "export_gguf",
    "export_model",
    "merge_adapter",
    "quantize",
    "write_gguf",
    "write_lora_gguf",
]
