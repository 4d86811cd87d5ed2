"""Import direction: cache never imports torch; cache and predictors never import offload; one install."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def modules_after(stmt: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys; {stmt}; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_cache_is_pure_python():
    mods = modules_after("import cache, cache.policies, cache.expert_cache")
    assert "torch" not in mods and "offload" not in mods


def test_predictors_do_not_import_offload_or_cache():
    mods = modules_after("import predictors")
    assert "offload" not in mods and "cache" not in mods


def test_offload_import_does_not_initialise_cuda():
    out = subprocess.run([sys.executable, "-c", "import offload, torch; print(torch.cuda.is_initialized())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_packages_come_from_one_installation():
    import cache
    import offload
    import predictors

    roots = {Path(m.__file__).resolve().parent.parent for m in (cache, offload, predictors)}
    assert len(roots) == 1, f"cache/offload/predictors load from different places: {roots}"
