"""Style rules the code base keeps (docs: the style guide's "DoFns stay private")."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import apache_beam as beam

import moesif_beam.transforms


def test_every_dofn_of_the_transforms_is_private():
    # A composite PTransform is the public unit; the DoFns inside it are details.
    public = []
    package = moesif_beam.transforms
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, beam.DoFn)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                public.append(f"{module.__name__}.{name}")
    assert public == []
