"""Policy checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and primitives only, so it loads without unpickling code::

    {"format": "latentsel-policy/1", "step": int, "policy": str,
     "model_config": {GPTConfig fields}, "tokenizer": {"alphabet", "routes", "skills", "max_len"},
     "train_config": {TrainConfig fields} | None,
     "model": state_dict, "optimizer": state_dict | None}

Every step's randomness is derived from ``(seed, step, rank)``, so the weights, the optimizer
state and the step are all a resumed run needs to continue the same stream.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from latentsel._io import atomic_open
from latentsel.policy.model import GPT, GPTConfig
from latentsel.policy.tokenizer import Tokenizer

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_policy", "export_policy",
           "tokenizer_dict", "check_tokenizer"]

FORMAT = "latentsel-policy/1"
_MAX_GZ = 4 << 30  # bytes a compressed checkpoint may expand to
_REQUIRED = ("format", "step", "policy", "model_config", "tokenizer", "model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a policy checkpoint; names the file."""


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _load_failure(e: BaseException) -> str:
    """Why ``torch.load`` failed, as one plain line.

    torch's own message is several lines with terminal escapes, and for a pickled object it
    advises loading again with ``weights_only`` off, which would run whatever code the file
    holds: that advice is never passed on, only which object the file holds.
    """
    text = _ANSI.sub("", str(e))
    if "weights_only" in text or "weights only" in text.lower():
        found = _GLOBAL.search(text)
        if found is None and not isinstance(e, pickle.UnpicklingError):
            return "torch cannot load it as tensors and plain data"
        what = f" ({found[1]})" if found else ""
        return (f"it holds a pickled Python object{what}, not only tensors and plain data; "
                f"a policy checkpoint never does, and such a file is not loaded")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return first if len(first) <= 200 else first[:200] + "…"


def tokenizer_dict(tok: Tokenizer) -> dict:
    return {"alphabet": tok.alphabet, "routes": list(tok.routes), "skills": list(tok.skills), "max_len": tok.max_len}


def save_checkpoint(path: str | os.PathLike, model: GPT, tokenizer: Tokenizer, *, step: int, policy: str,
                    train_config: dict | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write a checkpoint atomically (a reader or a resumed run never sees half a file)."""
    state = {
        "format": FORMAT,
        "step": int(step),
        "policy": str(policy),
        "model_config": model.config.to_dict(),
        "tokenizer": tokenizer_dict(tokenizer),
        "train_config": None if train_config is None else dict(train_config),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
    }
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict; :class:`CheckpointError` naming ``path`` if it cannot be one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".gz":  # a compressed copy (``export_policy(src, "x.pt.gz")`` writes one)
            with gzip.open(path, "rb") as f:
                source = io.BytesIO(f.read(_MAX_GZ + 1))
            if len(source.getbuffer()) > _MAX_GZ:
                raise CheckpointError(f"{path}: decompresses to more than {_MAX_GZ >> 30} GiB")
        else:
            source = path
        state = torch.load(source, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise CheckpointError(f"{path}: not a readable policy checkpoint ({_load_failure(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a latentsel policy checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return state


def export_policy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a checkpoint without its optimizer state (a third of the size): what sampling needs.
    A ``dst`` ending in ``.gz`` is gzip-compressed; :func:`load_checkpoint` reads either."""
    state = load_checkpoint(src)
    state["optimizer"] = None
    with atomic_open(dst, "wb") as f:
        torch.save(state, f)


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", world=None
                ) -> tuple[GPT, Tokenizer, dict]:
    """``(model in eval mode on device, tokenizer, checkpoint dict)`` of a checkpoint file.

    With ``world``, the checkpoint's tokenizer must be that world's (same alphabet, routings,
    skills and ``max_len``, in the same order); else :class:`CheckpointError` says what differs.
    """
    state = load_checkpoint(path)
    try:
        model = GPT(GPTConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        t = state["tokenizer"]
        tok = Tokenizer(t["alphabet"], tuple(t["routes"]), tuple(t["skills"]), int(t["max_len"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({str(e).splitlines()[0]})") from None
    if tok.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.vocab_size} tokens, model {model.config.vocab_size}")
    if world is not None:
        check_tokenizer(tok, Tokenizer.from_world(world), path)
    return model.to(device).eval(), tok, state


def check_tokenizer(tok: Tokenizer, want: Tokenizer, path) -> None:
    """:class:`CheckpointError` naming ``path`` and the first difference when ``tok != want``."""
    if tok == want:
        return
    for field, a, b in (("alphabet", tok.alphabet, want.alphabet), ("routings", tok.routes, want.routes),
                        ("skills", tok.skills, want.skills), ("max_len", tok.max_len, want.max_len)):
        if a != b:
            if isinstance(a, tuple):
                extra, missing = sorted(set(a) - set(b)), sorted(set(b) - set(a))
                what = (f"{len(a)} {field}, the world {len(b)}" if extra or missing or len(a) != len(b)
                        else f"the {field} in another order")
                detail = f" (checkpoint only: {extra[:3]}; world only: {missing[:3]})" if extra or missing else ""
                raise CheckpointError(f"{path}: a policy of another world: it has {what}{detail}")
            raise CheckpointError(f"{path}: a policy of another world: its {field} is {str(a)[:60]!r}, "
                                  f"the world's {str(b)[:60]!r}")
