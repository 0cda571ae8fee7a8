"""Module paths from before the subpackages, kept working: ``import ddpm_fast.sampler`` (and ``python -m
ddpm_fast.metrics ...``) give the module at its new home, the same object, so state such as the graph cache is
shared. Installed by ddpm_fast/__init__.py; CHANGELOG.md lists every move."""
import importlib
import importlib.abc
import importlib.machinery
import sys

ALIASES = {
    "ddpm_fast.sampler": "ddpm_fast.sampling",
    "ddpm_fast.sampler_graph": "ddpm_fast.sampling.graphs",
    "ddpm_fast.unet_diffusers": "ddpm_fast.models.diffusers",
    "ddpm_fast.metrics": "ddpm_fast.eval.metrics",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new path (importing that one first)."""

    def __init__(self, target):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system set the alias's spec on the shared module: undo that

    def get_code(self, fullname):
        """What ``python -m OLD.PATH`` runs: the module at its new path, as __main__."""
        return compile(f"import runpy\nrunpy.run_module({self.target!r}, run_name='__main__', alter_sys=True)\n",
                       f"<alias {fullname} -> {self.target}>", "exec")


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install():
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
