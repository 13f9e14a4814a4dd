"""Export of thresholded models: dense twins and compressed files."""

from .dense import to_dense
from .fileformat import CorruptFileError, FileReport, load, load_state_dict, save

__all__ = ["CorruptFileError", "FileReport", "load", "load_state_dict", "save", "to_dense"]
