"""Register the packed export's quantization method with transformers once transformers loads its
model code, so that `import distill` stays light (no torch, no transformers) and still makes

    AutoModelForCausalLM.from_pretrained("runs/demo/export/packed")

return the sparse student. `from_pretrained` lives in `transformers.modeling_utils`, so by the time
anything can load a model that module has finished loading; the registration runs right after it
(the registering module needs `AttentionInterface` and friends from it, so it cannot run earlier).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MODEL_CODE = "transformers.modeling_utils"


def register() -> None:
    importlib.import_module("distill.export.hf_quantizer")  # its class decorators register the method


class _RegisterAfterExecuting(importlib.abc.Loader):
    """The module's own loader, plus the registration once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name: str):  # resource readers and the like: the wrapped loader's
        return getattr(self.loader, name)


class _FindModelCode(importlib.abc.MetaPathFinder):
    """Steps in once, for MODEL_CODE: the other finders find it, and its loader gets wrapped."""

    def find_spec(self, name, path=None, target=None):
        if name != MODEL_CODE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExecuting(spec.loader)
        return spec


def register_when_transformers_loads() -> None:
    if MODEL_CODE in sys.modules:  # transformers' model code is loaded already: register now
        register()
    elif not any(isinstance(finder, _FindModelCode) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FindModelCode())
