"""The preference store: pairs waiting for labels, the labels people (or a simulated annotator)
give them, and the annotators. No Ray here: any process (the labeling server, the online loop,
a notebook) opens the same database by URL.

Tables (SQLAlchemy 2.x; SQLite by default, PostgreSQL with ``postgresql+psycopg://...``):

==============  =====================================================================
``pairs``       ``pair_id``, ``prompt``, the two images ``a`` and ``b`` (bytes in
                ``image_a`` / ``image_b``, or a path / URI in ``uri_a`` / ``uri_b``),
                ``policy_version`` (the weights that sampled them), ``round``,
                ``priority`` (served first when higher: e.g. the reward's uncertainty),
                ``source``, ``created``
``annotators``  ``name``, ``token_hash`` (SHA-256 of the bearer token: the token itself
                is shown once, never stored), ``created``
``assignments`` which pair was served to whom and which stored image was shown on the
                left (``left`` = ``a`` or ``b``); unique per (pair, annotator): a pair is
                never served twice to the same person
``labels``      ``pair_id``, ``annotator``, ``decision`` (``w``: image a preferred, ``l``:
                image b preferred, ``tie``), optional ``severity`` (0..3, of the rejected
                image's error, BACON's levels), ``shown_left``, ``created``, ``elapsed_s``;
                unique per (pair, annotator)
==============  =====================================================================

Every write is one committed transaction before the call returns, so a killed process loses
nothing it acknowledged. SQLite runs in WAL mode with ``synchronous=FULL`` and a busy timeout,
so a labeling server and the training loop may write to one file at once.

:meth:`PreferenceStore.export` writes the labeled pairs in the pair Parquet format
(``armature.data.pairs``): ``image_w`` = image a, ``image_l`` = image b, and ``label`` the
pair's resolved decision (majority of its labels; a draw between ``w`` and ``l`` is a ``tie``).
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import (
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__all__ = ["DECISIONS", "CHOICES", "PreferenceStore", "hash_token", "resolve_decisions", "decision_for"]

DECISIONS = ("w", "l", "tie")  # relative to the stored images: w = image a preferred, l = image b
CHOICES = ("left", "right", "none")  # what the annotator clicked
SEVERITIES = (0, 1, 2, 3)


class Base(DeclarativeBase):
    pass


class PairRow(Base):
    __tablename__ = "pairs"
    pair_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    image_a: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    image_b: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    uri_a: Mapped[str | None] = mapped_column(Text, nullable=True)
    uri_b: Mapped[str | None] = mapped_column(Text, nullable=True)
    policy_version: Mapped[int] = mapped_column(Integer, default=0)
    round: Mapped[int] = mapped_column(Integer, default=0, index=True)
    priority: Mapped[float] = mapped_column(Float, default=0.0)
    source: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created: Mapped[float] = mapped_column(Float, index=True)


class AnnotatorRow(Base):
    __tablename__ = "annotators"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[float] = mapped_column(Float)


class AssignmentRow(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("pair_id", "annotator"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pair_id: Mapped[str] = mapped_column(ForeignKey("pairs.pair_id"), index=True)
    annotator: Mapped[str] = mapped_column(ForeignKey("annotators.name"), index=True)
    left: Mapped[str] = mapped_column(String(1))  # "a" or "b": the stored image shown on the left
    served: Mapped[float] = mapped_column(Float)
    done: Mapped[int] = mapped_column(Integer, default=0)


class LabelRow(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("pair_id", "annotator"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pair_id: Mapped[str] = mapped_column(ForeignKey("pairs.pair_id"), index=True)
    annotator: Mapped[str] = mapped_column(ForeignKey("annotators.name"), index=True)
    decision: Mapped[str] = mapped_column(String(3))
    severity: Mapped[int | None] = mapped_column(Integer, nullable=True)
    shown_left: Mapped[str | None] = mapped_column(String(1), nullable=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    elapsed_s: Mapped[float | None] = mapped_column(Float, nullable=True)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a bearer token (tokens are 256-bit random: no salt needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def decision_for(choice: str, left: str) -> str:
    """The stored decision for a click: ``choice`` (left / right / none) on a page that showed
    stored image ``left`` (``a`` or ``b``) on the left. ``w`` means image a won."""
    if choice not in CHOICES:
        raise ValueError(f"choice {choice!r}: expected one of {', '.join(CHOICES)}")
    if left not in ("a", "b"):
        raise ValueError(f"left {left!r}: expected 'a' or 'b'")
    if choice == "none":
        return "tie"
    winner = left if choice == "left" else ("b" if left == "a" else "a")
    return "w" if winner == "a" else "l"


def resolve_decisions(decisions: Iterable[str]) -> str | None:
    """One label for a pair from its annotators' decisions: the majority of ``w`` / ``l`` /
    ``tie``; ``tie`` when ``w`` and ``l`` draw for the most votes (people disagree); ``None``
    when there are no decisions."""
    counts = Counter(decisions)
    if not counts:
        return None
    top = max(counts.values())
    leaders = [d for d in DECISIONS if counts.get(d, 0) == top]
    return leaders[0] if len(leaders) == 1 else "tie"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def database_url(url_or_path: str | os.PathLike) -> str:
    """A SQLAlchemy URL: a URL as it is, a file path as ``sqlite:///<absolute path>``."""
    text = str(url_or_path)
    if "://" in text:
        return text
    path = Path(text).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class PreferenceStore:
    """Pairs, annotators, assignments and labels in one database (see the module docstring).

    ``url``: a SQLAlchemy URL or a file path (SQLite). ``labels_per_pair``: how many people
    label each pair before it stops being served. ``assignment_ttl_s``: a pair served but not
    labeled for this long no longer counts against ``labels_per_pair`` (the person left).
    """

    def __init__(
        self, url: str | os.PathLike = "feedback.db", labels_per_pair: int = 1, assignment_ttl_s: float = 600.0
    ):
        if int(labels_per_pair) < 1:
            raise ValueError(f"labels_per_pair={labels_per_pair}: must be at least 1")
        self.url = database_url(url)
        self.labels_per_pair = int(labels_per_pair)
        self.assignment_ttl_s = float(assignment_ttl_s)
        sqlite = self.url.startswith("sqlite")
        self.engine = create_engine(self.url, connect_args={"timeout": 30} if sqlite else {}, pool_pre_ping=not sqlite)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"PreferenceStore({self.engine.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------------ annotators
    def add_annotator(self, name: str, token: str | None = None) -> str:
        """Register an annotator; returns their bearer token (only its hash is stored)."""
        if not name or len(name) > 100:
            raise ValueError(f"annotator name {name!r}: 1 to 100 characters")
        token = token or secrets.token_urlsafe(32)
        with Session(self.engine) as s, s.begin():
            if s.get(AnnotatorRow, name) is not None:
                raise ValueError(f"annotator {name!r} exists already (pick another name)")
            s.add(AnnotatorRow(name=name, token_hash=hash_token(token), created=time.time()))
        return token

    def authenticate(self, token: str | None) -> str | None:
        """The annotator's name for a bearer token, or ``None``."""
        if not token:
            return None
        with Session(self.engine) as s:
            row = s.scalar(select(AnnotatorRow).where(AnnotatorRow.token_hash == hash_token(token)))
            return row.name if row is not None else None

    def annotators(self) -> list[str]:
        with Session(self.engine) as s:
            return list(s.scalars(select(AnnotatorRow.name).order_by(AnnotatorRow.name)))

    # ------------------------------------------------------------------ pairs
    def add_pairs(self, records: Iterable[dict]) -> list[str]:
        """Store pairs to label; returns their ids. Each record: ``prompt``, ``image_a`` and
        ``image_b`` (bytes, a PIL image or uint8 array: stored as PNG; or a ``str`` path / URI,
        stored as a reference), optional ``pair_id``, ``policy_version``, ``round``,
        ``priority``, ``source``."""
        from armature.data.pairs import encode_image

        rows, now = [], time.time()
        for record in records:
            row = PairRow(
                pair_id=str(record.get("pair_id") or uuid.uuid4().hex),
                prompt=str(record["prompt"]),
                policy_version=int(record.get("policy_version", 0)),
                round=int(record.get("round", 0)),
                priority=float(record.get("priority", 0.0)),
                source=record.get("source"),
                created=now,
            )
            for side in ("a", "b"):
                value = record[f"image_{side}"]
                if isinstance(value, (str, os.PathLike)):
                    setattr(row, f"uri_{side}", str(value))
                else:
                    setattr(row, f"image_{side}", encode_image(value))
            rows.append(row)
        ids = [r.pair_id for r in rows]
        with Session(self.engine) as s, s.begin():
            s.add_all(rows)
        return ids

    def image(self, pair_id: str, side: str) -> bytes:
        """The encoded bytes of stored image ``a`` or ``b`` of a pair."""
        from armature.data.pairs import load_bytes

        if side not in ("a", "b"):
            raise ValueError(f"side {side!r}: expected 'a' or 'b'")
        with Session(self.engine) as s:
            row = s.get(PairRow, pair_id)
            if row is None:
                raise KeyError(f"no pair {pair_id!r}")
            data, uri = getattr(row, f"image_{side}"), getattr(row, f"uri_{side}")
        return data if data is not None else load_bytes(uri)

    def pair(self, pair_id: str) -> dict | None:
        with Session(self.engine) as s:
            row = s.get(PairRow, pair_id)
            if row is None:
                return None
            return {
                "pair_id": row.pair_id,
                "prompt": row.prompt,
                "policy_version": row.policy_version,
                "round": row.round,
                "priority": row.priority,
                "source": row.source,
                "created": row.created,
            }

    def _live(self, now: float):
        """Assignments that count against ``labels_per_pair``: labeled, or served within the TTL."""
        return (AssignmentRow.done == 1) | (AssignmentRow.served > now - self.assignment_ttl_s)

    def _open_count(self, s: Session, now: float):
        """Per pair: labels plus served-but-unlabeled assignments younger than the TTL."""
        return (
            select(AssignmentRow.pair_id, func.count().label("n"))
            .where(self._live(now))
            .group_by(AssignmentRow.pair_id)
            .subquery()
        )

    def next_pair(self, annotator: str, rng: random.Random | None = None) -> dict | None:
        """Serve the annotator a pair: their pending one if they have it (a reloaded page),
        else the highest-priority, oldest pair they have never been served that still needs
        labels. The left/right order is drawn here and recorded. ``None``: nothing to label.

        The count against ``labels_per_pair`` and the insert are one step: the pair's row is
        written first (a row lock on PostgreSQL, the database's write lock on SQLite), so
        everyone serving the same pair waits for the one before, then counts again."""
        rng = rng or random.SystemRandom()
        while True:  # lost a pair to another annotator: they used up its capacity, so this ends
            now = time.time()
            with Session(self.engine) as s:
                pending = s.scalar(
                    select(AssignmentRow)
                    .where(AssignmentRow.annotator == annotator, AssignmentRow.done == 0)
                    .order_by(AssignmentRow.served.desc())
                )
                if pending is not None:
                    return {**self.pair(pending.pair_id), "left": pending.left}
                mine = select(AssignmentRow.pair_id).where(AssignmentRow.annotator == annotator)
                counts = self._open_count(s, now)
                candidate = s.scalar(
                    select(PairRow.pair_id)
                    .outerjoin(counts, counts.c.pair_id == PairRow.pair_id)
                    .where(PairRow.pair_id.not_in(mine), func.coalesce(counts.c.n, 0) < self.labels_per_pair)
                    .order_by(PairRow.priority.desc(), PairRow.created, PairRow.pair_id)
                    .limit(1)
                )
                if candidate is None:
                    return None
                s.execute(update(PairRow).where(PairRow.pair_id == candidate).values(priority=PairRow.priority))
                taken = s.scalar(
                    select(func.count())
                    .select_from(AssignmentRow)
                    .where(AssignmentRow.pair_id == candidate, self._live(now))
                )
                if taken >= self.labels_per_pair:
                    s.rollback()
                    continue
                left = rng.choice("ab")
                s.add(AssignmentRow(pair_id=candidate, annotator=annotator, left=left, served=now))
                try:
                    s.commit()
                except IntegrityError:  # the same annotator, served this pair from another page
                    s.rollback()
                    continue
            return {**self.pair(candidate), "left": left}

    # ------------------------------------------------------------------ labels
    def submit(self, annotator: str, pair_id: str, choice: str, severity: int | None = None) -> dict:
        """Record a click on a served pair (``choice``: left / right / none), mapped through the
        left/right order recorded when it was served. Committed before it returns."""
        if choice not in CHOICES:
            raise ValueError(f"choice {choice!r}: expected one of {', '.join(CHOICES)}")
        with Session(self.engine) as s:
            served = s.scalar(
                select(AssignmentRow).where(AssignmentRow.pair_id == pair_id, AssignmentRow.annotator == annotator)
            )
            if served is None:
                raise PermissionError(f"pair {pair_id!r} was not served to {annotator!r}")
            left, served_at = served.left, served.served
        decision = decision_for(choice, left)
        return self.add_label(
            annotator, pair_id, decision, severity=severity, shown_left=left, elapsed_s=time.time() - served_at
        )

    def add_label(
        self,
        annotator: str,
        pair_id: str,
        decision: str,
        severity: int | None = None,
        shown_left: str | None = None,
        elapsed_s: float | None = None,
    ) -> dict:
        """Store one label (``decision``: ``w`` image a preferred, ``l`` image b, ``tie``).
        One label per (pair, annotator): a second one raises ``ValueError``."""
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r}: expected one of {', '.join(DECISIONS)}")
        if severity is not None and int(severity) not in SEVERITIES:
            raise ValueError(f"severity {severity!r}: expected 0, 1, 2 or 3 (or none)")
        now = time.time()
        with Session(self.engine) as s:
            if s.get(PairRow, pair_id) is None:
                raise KeyError(f"no pair {pair_id!r}")
            assignment = s.scalar(
                select(AssignmentRow).where(AssignmentRow.pair_id == pair_id, AssignmentRow.annotator == annotator)
            )
            if assignment is None:  # labeled without being served (a simulated annotator)
                s.add(AssignmentRow(pair_id=pair_id, annotator=annotator, left=shown_left or "a", served=now, done=1))
            else:
                assignment.done = 1
            s.add(
                LabelRow(
                    pair_id=pair_id,
                    annotator=annotator,
                    decision=decision,
                    severity=None if severity is None else int(severity),
                    shown_left=shown_left,
                    created=now,
                    elapsed_s=elapsed_s,
                )
            )
            try:
                s.commit()
            except IntegrityError as err:
                s.rollback()
                raise ValueError(f"{annotator!r} has labeled pair {pair_id!r} already") from err
        return {
            "pair_id": pair_id,
            "annotator": annotator,
            "decision": decision,
            "severity": severity,
            "shown_left": shown_left,
            "created": now,
        }

    def labels(self, since_id: int = 0) -> list[dict]:
        """Every label (or those after row ``since_id``), oldest first, with its row ``id``."""
        with Session(self.engine) as s:
            rows = s.scalars(select(LabelRow).where(LabelRow.id > since_id).order_by(LabelRow.id))
            return [
                {
                    "id": r.id,
                    "pair_id": r.pair_id,
                    "annotator": r.annotator,
                    "decision": r.decision,
                    "severity": r.severity,
                    "shown_left": r.shown_left,
                    "created": r.created,
                    "elapsed_s": r.elapsed_s,
                }
                for r in rows
            ]

    def unlabeled(self, annotator: str, limit: int | None = None) -> list[str]:
        """Ids of pairs the annotator has not been served yet, oldest first."""
        with Session(self.engine) as s:
            mine = select(AssignmentRow.pair_id).where(AssignmentRow.annotator == annotator)
            query = (
                select(PairRow.pair_id).where(PairRow.pair_id.not_in(mine)).order_by(PairRow.created, PairRow.pair_id)
            )
            return list(s.scalars(query.limit(limit) if limit else query))

    # ------------------------------------------------------------------ summaries
    def progress(self, annotator: str) -> dict:
        """``labeled`` by this annotator, ``remaining`` pairs they could still be served, and
        ``per_minute``: their throughput over their labels of the last hour."""
        now = time.time()
        with Session(self.engine) as s:
            labeled = s.scalar(select(func.count()).select_from(LabelRow).where(LabelRow.annotator == annotator))
            recent = list(
                s.scalars(
                    select(LabelRow.created)
                    .where(LabelRow.annotator == annotator, LabelRow.created > now - 3600)
                    .order_by(LabelRow.created)
                )
            )
            mine = select(AssignmentRow.pair_id).where(AssignmentRow.annotator == annotator)
            counts = self._open_count(s, now)
            remaining = s.scalar(
                select(func.count())
                .select_from(PairRow)
                .outerjoin(counts, counts.c.pair_id == PairRow.pair_id)
                .where(PairRow.pair_id.not_in(mine), func.coalesce(counts.c.n, 0) < self.labels_per_pair)
            )
        per_minute = 0.0
        if len(recent) >= 2:
            per_minute = 60.0 * (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)
        return {
            "annotator": annotator,
            "labeled": int(labeled),
            "remaining": int(remaining),
            "per_minute": round(per_minute, 2),
        }

    def counts(self) -> dict[str, int]:
        """Pairs, labels by decision, labeled pairs, annotators."""
        with Session(self.engine) as s:
            out = {
                "pairs": s.scalar(select(func.count()).select_from(PairRow)),
                "labels": s.scalar(select(func.count()).select_from(LabelRow)),
                "labeled_pairs": s.scalar(select(func.count(func.distinct(LabelRow.pair_id)))),
                "annotators": s.scalar(select(func.count()).select_from(AnnotatorRow)),
            }
            for decision, n in s.execute(select(LabelRow.decision, func.count()).group_by(LabelRow.decision)):
                out[f"labels_{decision}"] = n
        for decision in DECISIONS:
            out.setdefault(f"labels_{decision}", 0)
        return {k: int(v or 0) for k, v in out.items()}

    def counts_by_round(self) -> dict[int, int]:
        """How many pairs each round stored."""
        with Session(self.engine) as s:
            return {int(r): int(n) for r, n in s.execute(select(PairRow.round, func.count()).group_by(PairRow.round))}

    def rounds(self) -> dict[str, int]:
        """Every stored pair's round, by pair id."""
        with Session(self.engine) as s:
            return {pid: int(r) for pid, r in s.execute(select(PairRow.pair_id, PairRow.round))}

    def decisions(self, pair_ids: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Per labeled pair (of ``pair_ids`` when given), its decisions in label order."""
        keep = None if pair_ids is None else set(pair_ids)
        out: dict[str, list[str]] = {}
        for label in self.labels():
            if keep is None or label["pair_id"] in keep:
                out.setdefault(label["pair_id"], []).append(label["decision"])
        return out

    def agreement(self, pair_ids: Iterable[str] | None = None) -> dict[str, float]:
        """Inter-annotator agreement over pairs with two or more labels (of ``pair_ids`` when
        given): ``agreement`` is the
        share of annotator pairs (i, j) labeling the same pair who gave the same decision
        (pairwise percent agreement, ties count as a decision); ``kappa`` is Fleiss' kappa over
        the same items, ``(P_bar - P_e) / (1 - P_e)`` with ``P_e = sum_k p_k^2``."""
        items = [d for d in self.decisions(pair_ids).values() if len(d) >= 2]
        if not items:
            return {"agreement": float("nan"), "kappa": float("nan"), "multi_labeled_pairs": 0}
        agree = total = 0
        per_item = []
        for decisions in items:
            n = len(decisions)
            counts = Counter(decisions)
            same = sum(c * (c - 1) for c in counts.values())
            agree, total = agree + same, total + n * (n - 1)
            per_item.append(same / (n * (n - 1)))
        all_decisions = Counter(d for decisions in items for d in decisions)
        n_all = sum(all_decisions.values())
        p_e = sum((c / n_all) ** 2 for c in all_decisions.values())
        p_bar = sum(per_item) / len(per_item)
        kappa = (p_bar - p_e) / (1 - p_e) if p_e < 1 else 1.0
        return {"agreement": agree / total, "kappa": kappa, "multi_labeled_pairs": len(items)}

    def export(self, path: str | os.PathLike, since_round: int | None = None, min_labels: int = 1) -> int:
        """Write the labeled pairs (``min_labels`` labels or more; from round ``since_round`` on
        when given) in the pair Parquet format; returns how many. Severity, when people gave
        one, is the rounded mean over the labels and goes to the rejected image's column."""
        from armature.data.pairs import write_pairs

        by_pair: dict[str, list[dict]] = {}
        for label in self.labels():
            by_pair.setdefault(label["pair_id"], []).append(label)
        records = []
        for pair_id in sorted(by_pair):
            labels = by_pair[pair_id]
            if len(labels) < min_labels:
                continue
            info = self.pair(pair_id)
            if since_round is not None and info["round"] < since_round:
                continue
            label = resolve_decisions(lab["decision"] for lab in labels)
            severities = [lab["severity"] for lab in labels if lab["severity"] is not None]
            severity = round(sum(severities) / len(severities)) if severities else None
            records.append(
                {
                    "pair_id": pair_id,
                    "prompt": info["prompt"],
                    "label": label,
                    "image_w": self.image(pair_id, "a"),
                    "image_l": self.image(pair_id, "b"),
                    "severity_w": severity if label == "l" else None,
                    "severity_l": severity if label == "w" else None,
                    "source": info["source"] or f"feedback:v{info['policy_version']}",
                }
            )
        return write_pairs(records, path)
