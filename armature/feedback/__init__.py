"""Online human feedback: the preference store (``store``: SQLAlchemy, SQLite or PostgreSQL, no
Ray), the labeling web page (``web``: a FastAPI app) and the simulated annotator
(``simulated``: a reward with noise and ties standing in for people).

The online loop that ties them to the samplers and the DPO learner is
``armature/jobs/online_dpo.py``.
"""

from armature.feedback.store import DECISIONS, PreferenceStore, hash_token, resolve_decisions

__all__ = ["DECISIONS", "PreferenceStore", "hash_token", "resolve_decisions"]
