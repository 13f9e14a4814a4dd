"""The vocabulary of the compressed file format, shared by its writer and its reader: the format's name and
versions, the dtypes a file may hold, the limits a reader enforces, and the error raised for any file that
is not a well-formed one.

Versions: ``1`` (the first files: a CRC32 per stored tensor, the safetensors tensor table not covered) and
``2`` (written since: the header carries a copy of the whole safetensors tensor table, dtype, shape, offsets
and CRC32 of every stored tensor, so that no byte that decides how data is read is outside a checksum;
weights are stored lossless in their own dtype, float64 included). Both are read.
"""

from __future__ import annotations

import torch

__all__ = ["HEADER_BYTE_COST", "MAGIC", "NODE_COST", "READ_VERSIONS", "ST_DTYPES", "VALUE_DTYPES", "VERSION", "WEIGHT_DTYPES",
           "CorruptFileError", "st_name"]

#: The ``format`` entry of the safetensors metadata.
MAGIC = "bayes_sparse"
#: The ``version`` entry written by :func:`bayes_sparse.export.save`.
VERSION = 2
#: The versions a reader accepts (it refuses every other one).
READ_VERSIONS = (1, 2)
#: ``save``'s float value encodings (the alternative is a codebook). ``"float32"`` is the lossless one:
#: since version 2 each weight's non-zeros are stored in the weight's own dtype (float64 ones as float64).
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Dtypes a sparse-encoded weight may be restored to, and (since version 2) its float value streams' dtypes.
WEIGHT_DTYPES = {**VALUE_DTYPES, "float64": torch.float64}
#: Safetensors dtype names of the tensors a file may store, and their torch dtypes.
ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
             "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F16": torch.float16,
             "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
#: Elements of ``max_numel`` that each module of a recorded module tree costs (building one takes about as
#: long as decoding 10**4 elements): the default budget admits trees of 16,384 modules.
NODE_COST = 1 << 14
#: Elements of ``max_numel`` that each byte of a file's JSON headers (the safetensors one, and the package
#: one decompressed) costs: parsing JSON takes up to about 28 bytes of memory per byte of text (small nested
#: objects), as much as 7 float32 elements.
HEADER_BYTE_COST = 8


def st_name(dtype: torch.dtype) -> str:
    """The safetensors name of a storable dtype.

    Raises:
        TypeError: a dtype the format does not store (complex, float8, unsigned 16-64 bit ...).
    """
    try:
        return _ST_NAMES[dtype]
    except KeyError:
        raise TypeError(f"the file format does not store {dtype} tensors; storable: "
                        f"{sorted(str(d)[6:] for d in _ST_NAMES)}") from None


class CorruptFileError(ValueError):
    """The file is not a bayes_sparse model file, or it is damaged. The message names the file and, where
    there is one, the tensor and the field that were found wrong."""
