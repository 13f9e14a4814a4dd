"""Training checkpoints of sparse models as safetensors files: every tensor of the ``state_dict`` plus the
layers' extra state (method, options, fixed-mask flag) as JSON metadata. No pickle, so loading never runs
code; the file loads back into a model sparsified the same way (``load_checkpoint``).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Union

from torch import Tensor, nn

from .._validation import check_module

__all__ = ["load_checkpoint", "save_checkpoint"]

_FORMAT = "bayes_sparse.checkpoint"
PathLike = Union[str, os.PathLike]


def save_checkpoint(model: nn.Module, path: PathLike) -> str:
    """Write ``model.state_dict()`` (sparse layers included, mid-training or thresholded) to a safetensors file.

    Tensors are stored as they are (tied ones as separate copies); non-tensor entries (each sparse layer's
    ``_extra_state``) go into the metadata as JSON.

    Args:
        model: Any module.
        path: Destination file.

    Returns:
        ``str(path)``.

    Raises:
        TypeError: a non-tensor entry that JSON cannot hold.

    Example:
        >>> import bayes_sparse as bs, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
        >>> net = bs.sparsify(nn.Sequential(nn.Linear(4, 2)))
        >>> _ = save_checkpoint(net, p); load_checkpoint(bs.sparsify(nn.Sequential(nn.Linear(4, 2))), p)[0].method
        'vd'
    """
    from safetensors.torch import save_file

    check_module(model)
    tensors: dict[str, Tensor] = {}
    extra: dict[str, object] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            if t.data_ptr() in seen and t.numel():
                t = t.clone()  # safetensors stores no shared memory
            seen.add(t.data_ptr())
            tensors[key] = t
        else:
            extra[key] = value
    try:
        extra_json = json.dumps(extra)
    except TypeError as e:
        raise TypeError(f"a non-tensor state_dict entry cannot be stored as JSON: {e}") from e
    # safetensors' save_file streams the tensors to disk (no second, serialized copy in memory) but leaves the
    # file 0600 whatever the umask: the file is first created as any other (or kept, with its mode, when it
    # exists), and its mode is put back afterwards
    target = Path(path)
    target.touch()
    mode = stat.S_IMODE(target.stat().st_mode)
    save_file(tensors, str(target), metadata={"format": _FORMAT, "extra_state": extra_json})
    os.chmod(target, mode)
    return str(path)


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_checkpoint` into ``model`` (sparsified like the saved one).

    Returns:
        ``model``.

    Raises:
        ValueError: the file is not a bayes_sparse checkpoint.
        RuntimeError: it does not fit ``model`` (from ``load_state_dict``), e.g. another method's layers.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    check_module(model)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a bayes_sparse checkpoint (format {metadata.get('format')!r}); write it "
                         "with bayes_sparse.export.save_checkpoint (model files: bayes_sparse.export.load)")
    state: dict[str, object] = dict(load_file(str(path)))
    state.update(json.loads(metadata.get("extra_state", "{}")))
    model.load_state_dict(state, strict=strict)
    return model
