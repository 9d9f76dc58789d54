"""Sam3D's registration with transformers (Auto classes, the pipeline task), done without importing transformers.

`import sam3d_hf` must stay light (`sam3d --help` and `--version` import no torch), yet `import sam3d_hf` followed by
`AutoModel.from_pretrained(folder)` or `pipeline("sam3d-segmentation", ...)` must find Sam3D. So each registration
runs as soon as both its transformers module and its sam3d_hf module are imported: at once when they already are,
otherwise when the later of the two finishes importing. A `sys.meta_path` finder watches only those transformers
modules and this package's own modules, and wraps their loader's `exec_module`; nothing else is touched. While a
sam3d_hf module is still executing, registrations wait (importing a module that imports it back would meet it half
made), and run when the outermost one finishes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

PACKAGE = __name__.rpartition(".")[0]


def _configs() -> None:
    from transformers import AutoConfig

    from .configuration_sam3d import Sam3DConfig, Sam3DVisionConfig

    AutoConfig.register(Sam3DConfig.model_type, Sam3DConfig, exist_ok=True)
    AutoConfig.register(Sam3DVisionConfig.model_type, Sam3DVisionConfig, exist_ok=True)


def _models() -> None:
    from transformers import AutoModel, AutoModelForMaskGeneration

    from .configuration_sam3d import Sam3DConfig, Sam3DVisionConfig
    from .modeling_sam3d import Sam3DForPromptableSegmentation, Sam3DVisionModel

    AutoModel.register(Sam3DConfig, Sam3DForPromptableSegmentation, exist_ok=True)
    AutoModel.register(Sam3DVisionConfig, Sam3DVisionModel, exist_ok=True)
    AutoModelForMaskGeneration.register(Sam3DConfig, Sam3DForPromptableSegmentation, exist_ok=True)


# (transformers module, this package's module, registration): the registration needs both imported. The last three
# modules register themselves at their end, because their copies in a saved folder (the remote code that serves
# `trust_remote_code=True` without this package) must too: for them, importing the module is the registration. The
# configuration and modeling copies must not: a remote copy would take over the `sam3d` model type.
REGISTRATIONS = (
    ("transformers.models.auto.configuration_auto", "configuration_sam3d", _configs),
    ("transformers.models.auto.modeling_auto", "modeling_sam3d", _models),
    ("transformers.models.auto.image_processing_auto", "image_processing_sam3d", None),
    ("transformers.models.auto.processing_auto", "processing_sam3d", None),
    ("transformers.pipelines", "pipeline", None),
)
_WATCHED = {transformers_module for transformers_module, _, _ in REGISTRATIONS}
_done: set = set()  # the transformers modules whose registration has run


def _executing(module) -> bool:
    return getattr(getattr(module, "__spec__", None), "_initializing", False)


def _imported(name: str, finished: str | None = None) -> bool:
    """Whether module `name` is in sys.modules and done executing (`finished` is the one whose exec just ended)."""
    module = sys.modules.get(name)
    return module is not None and (name == finished or not _executing(module))


def _settle(finished: str | None = None) -> None:
    """Run every registration whose two modules are imported, importing this package's side where transformers' side
    already is; wait while a module of this package (other than the package itself) is still executing."""
    if any(
        _executing(module)
        for name, module in list(sys.modules.items())
        if name.startswith(PACKAGE + ".") and name != finished
    ):
        return
    for transformers_module, module, register in REGISTRATIONS:
        if transformers_module in _done or not _imported(transformers_module, finished):
            continue
        if not _imported(f"{PACKAGE}.{module}", finished):
            importlib.import_module(f".{module}", PACKAGE)  # its end settles again, and registers
        if transformers_module not in _done:
            _done.add(transformers_module)
            if register is not None:
                register()


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it takes the spec the other finders give and, once the module's code
    has run, settles the registrations."""

    sam3d_registration = True

    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED and not fullname.startswith(PACKAGE + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "sam3d_registration", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            run = loader.exec_module

            def exec_module(module, run=run, name=fullname):
                run(module)
                _settle(finished=name)

            loader.exec_module = exec_module  # this loader instance serves this one module only
        return spec


def install() -> None:
    """Watch the imports (once per process: a re-imported package replaces its old watcher) and register what can
    be registered now."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not getattr(finder, "sam3d_registration", False)]
    sys.meta_path.insert(0, _Watcher())
    _settle()
