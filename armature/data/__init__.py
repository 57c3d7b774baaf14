"""Preference data: the pair format (``pairs``), synthetic localized-degradation pairs
(``synthetic``) and the Ray Data pipeline into the learners (``stream``, the only module here
that imports Ray at import time)."""

from armature.data.pairs import (
    COLUMNS,
    LABELS,
    REASON_CODES,
    SEVERITY_LEVELS,
    check_record,
    read_pairs,
    validate_pairs,
    write_pairs,
)

__all__ = [
    "COLUMNS",
    "LABELS",
    "REASON_CODES",
    "SEVERITY_LEVELS",
    "check_record",
    "read_pairs",
    "validate_pairs",
    "write_pairs",
]
