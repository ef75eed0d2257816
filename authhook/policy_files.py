"""Where the reference policies are: inside the installed wheel, or in a source checkout's ``policy/``.

The wheel carries ``policy/opa`` and ``policy/cedar`` as ``authhook/_policy/...`` (hatch force-include),
so ``pip install authhook`` works without the repository; an editable install reads the repository files.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_policy"
_CHECKOUT = Path(__file__).resolve().parent.parent / "policy"


def reference_policy(*parts: str) -> Path:
    """``reference_policy("opa", "authhook.rego")``: the packaged copy if present, else the checkout's."""
    packaged = _PACKAGED.joinpath(*parts)
    return packaged if packaged.exists() else _CHECKOUT.joinpath(*parts)
