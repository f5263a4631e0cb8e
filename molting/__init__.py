"""molting: AI personality portability.

Describe a persona, fine-tune a small chat model on it with LoRA, judge it by what it
generates, export it to GGUF, and serve it through transformers or llama.cpp.

Importing molting loads neither torch nor llama_cpp; they load when first used.
"""

from molting.backends import Backend, GenerationConfig, load_backend
from molting.errors import ConfigError, DatasetError, ExportError, MoltingError, PersonaError
from molting.persona import Persona
from molting.persona_dir import PersonaDir

__all__ = [
    "Backend",
    "ConfigError",
    "DatasetError",
    "ExportError",
    "GenerationConfig",
    "MoltingError",
    "Persona",
    "PersonaDir",
    "PersonaError",
    "load_backend",
]
__version__ = "0.1.0"
