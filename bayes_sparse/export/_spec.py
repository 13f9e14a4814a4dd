"""The vocabulary of the compressed file format, shared by its writer and its reader: the format's name and
version, the dtypes a file may hold, and the error raised for any file that is not a well-formed one.
"""

from __future__ import annotations

import torch

__all__ = ["MAGIC", "VALUE_DTYPES", "VERSION", "WEIGHT_DTYPES", "CorruptFileError"]

#: The ``format`` entry of the safetensors metadata.
MAGIC = "bayes_sparse"
#: The ``version`` entry; a reader refuses every other version.
VERSION = 1
#: Value encodings stored as floats (the alternative is ``"codebook"``).
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Dtypes a sparse-encoded weight may be restored to.
WEIGHT_DTYPES = {**VALUE_DTYPES, "float64": torch.float64}


class CorruptFileError(ValueError):
    """The file is not a bayes_sparse model file, or it is damaged. The message says what was found."""
