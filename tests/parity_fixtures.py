"""Where the parity fixtures live and how to compare against them (shared by all parity tests).

The fixture root is $INFINITY_PARITY_FIXTURES, default <repo>/../shared/fixtures/parity. A chain is
any sub-folder holding `<io>.safetensors` (vae_io / transformer_io) plus meta.json, so another
fixture set in the same format runs unchanged. API:

    fixture_root() -> Path                  chains(io="vae_io") -> ["chain_2b", ...]
    require(io="vae_io")                    skip (fail when CI=true) if no chain has that file
    chain_dir(chain) -> Path                meta(chain) -> dict (meta.json)
    load_io(chain, io="vae_io") -> {name: tensor}
    tolerance(group, name) -> {"atol", "rtol", ...extras}   from tolerances.json
    assert_close(actual, expected, tol, what="") -> max |diff|

Use in a test module:

    @pytest.fixture(scope="module", params=pf.chains() or [None])
    def chain(request):
        pf.require()
        return request.param
"""
from __future__ import annotations

import fnmatch
import functools
import json
import os
from pathlib import Path

import pytest
import torch

ENV = "INFINITY_PARITY_FIXTURES"
_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "parity"


def fixture_root() -> Path:
    return Path(os.environ.get(ENV) or _DEFAULT)


def chains(io: str = "vae_io") -> list[str]:
    """Names of the chain folders under the root that hold `<io>.safetensors`, sorted."""
    root = fixture_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / f"{io}.safetensors").is_file())


def require(io: str = "vae_io") -> None:
    """Skip the calling test when no fixtures are found; fail instead when CI=true."""
    if chains(io):
        return
    msg = (f"no parity fixtures ({io}.safetensors) under {fixture_root()}; "
           f"set {ENV} to the fixture folder (the one with tolerances.json and chain_*/)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def chain_dir(chain: str) -> Path:
    return fixture_root() / chain


def meta(chain: str) -> dict:
    """meta.json of a chain (cached; do not modify it)."""
    return _json(chain_dir(chain) / "meta.json")


@functools.cache
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@functools.cache
def _load(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def load_io(chain: str, io: str = "vae_io") -> dict[str, torch.Tensor]:
    """All tensors of `<chain>/<io>.safetensors` (cached; do not modify them in place)."""
    return _load(chain_dir(chain) / f"{io}.safetensors")


def tolerance(group: str, name: str) -> dict:
    """The tolerance of tensor `name` in `group` ("vae_io" or "transformer_io") from tolerances.json.
    Keys there are glob patterns ("quant.bits.s*"), possibly several separated by ", " (later ones may
    omit the first one's dotted prefix, e.g. "forward.inter.cond_BD, block_in") and followed by a note
    in parentheses. The most specific matching key wins. Returns a dict with atol and rtol (0 for the
    "exact" entries, which also get exact=True) plus the entry's other fields (mean_abs_max, scale_by,
    ...). Raises KeyError when nothing matches."""
    best = None
    for key, entry in _json(fixture_root() / "tolerances.json")[group].items():
        patterns = key.split(" (")[0].split(", ")
        prefix = patterns[0].rsplit(".", 1)[0] + "." if "." in patterns[0] else ""
        for p in patterns:
            if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, prefix + p):
                score = len(p.replace("*", ""))
                if best is None or score > best[0]:
                    best = (score, entry)
    if best is None:
        raise KeyError(f"no tolerance for {group}/{name} in {fixture_root() / 'tolerances.json'}")
    entry = best[1]
    if isinstance(entry, str):
        return {"atol": 0.0, "rtol": 0.0, "exact": True, "note": entry}
    return {"atol": 0.0, "rtol": 0.0, **entry}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str = "") -> float:
    """Elementwise |a - b| <= atol + rtol*|b| (and mean |a - b| <= mean_abs_max when given), after
    checking shapes. Compares in float64. Returns the max |diff|."""
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, b = actual.detach().cpu().double(), expected.detach().cpu().double()
    diff = (a - b).abs()
    bound = tol.get("atol", 0.0) + tol.get("rtol", 0.0) * b.abs()
    bad = diff > bound
    max_diff = diff.max().item() if diff.numel() else 0.0
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} values out of tolerance "
                           f"(atol={tol.get('atol', 0.0)}, rtol={tol.get('rtol', 0.0)}), max |diff| {max_diff:.3e}")
    if "mean_abs_max" in tol:
        assert diff.mean().item() <= tol["mean_abs_max"], \
            f"{what}: mean |diff| {diff.mean().item():.3e} > {tol['mean_abs_max']}"
    return max_diff
