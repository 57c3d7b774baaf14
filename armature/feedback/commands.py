"""``armature label ...``: the labeling server and the store's chores.

    armature label serve --db feedback.db [--host 0.0.0.0 --port 8300 --severity]
    armature label annotator NAME --db feedback.db      prints the new annotator's token once
    armature label import PAIRS.parquet --db ...        pairs to label (image_w/image_l as a/b)
    armature label status --db ...                      counts and agreement (JSON)
    armature label export OUT.parquet --db ...          labeled pairs in the pair format

``--db`` takes a file path (SQLite) or a SQLAlchemy URL (``postgresql+psycopg://...``); the
default is ``$ARMATURE_FEEDBACK_DB`` or ``feedback.db``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(sub) -> None:
    label = sub.add_parser(
        "label",
        help="human feedback: the labeling page and the preference store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = label.add_subparsers(dest="action", required=True)

    def db(parser):
        parser.add_argument(
            "--db",
            default=os.environ.get("ARMATURE_FEEDBACK_DB", "feedback.db"),
            help="SQLite path or SQLAlchemy URL (default $ARMATURE_FEEDBACK_DB or feedback.db)",
        )
        parser.add_argument("--labels-per-pair", type=int, default=1, help="people who label each pair")

    serve = actions.add_parser("serve", help="run the labeling web page")
    db(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8300)
    serve.add_argument("--severity", action="store_true", help="ask for the worse image's error severity (0-3)")
    annotator = actions.add_parser("annotator", help="add an annotator; prints their bearer token")
    annotator.add_argument("name")
    db(annotator)
    load = actions.add_parser("import", help="add pairs to label from a pair Parquet file or folder")
    load.add_argument("pairs")
    load.add_argument("--policy-version", type=int, default=0)
    db(load)
    status = actions.add_parser("status", help="counts and inter-annotator agreement")
    db(status)
    export = actions.add_parser("export", help="write the labeled pairs in the pair Parquet format")
    export.add_argument("out")
    export.add_argument("--min-labels", type=int, default=1)
    db(export)
    label.set_defaults(func=run)


def run(args) -> int:
    from armature.feedback.store import PreferenceStore

    if args.labels_per_pair < 1:
        print("armature: --labels-per-pair must be at least 1", file=sys.stderr)
        return 2
    if args.action == "serve":
        from armature.feedback.web import serve

        serve(args.db, host=args.host, port=args.port, severity=args.severity, labels_per_pair=args.labels_per_pair)
        return 0
    store = PreferenceStore(args.db, labels_per_pair=args.labels_per_pair)
    if args.action == "annotator":
        try:
            token = store.add_annotator(args.name)
        except ValueError as err:
            print(f"armature: {err}", file=sys.stderr)
            return 2
        print(token)
    elif args.action == "import":
        from armature.data.pairs import check_record, load_bytes, read_pairs

        good, refused = [], 0
        for r in read_pairs(args.pairs).to_pylist():
            reason, _ = check_record(r)  # paths out of the folder, pixel bombs, corrupt images
            if reason is not None:
                refused += 1
                print(f"armature: pair {r.get('pair_id')!r} not imported: {reason}", file=sys.stderr)
                continue
            good.append(
                {
                    "pair_id": r["pair_id"],
                    "prompt": r["prompt"],
                    "image_a": load_bytes(r["image_w"]),
                    "image_b": load_bytes(r["image_l"]),
                    "source": r.get("source"),
                    "policy_version": args.policy_version,
                }
            )
        ids = store.add_pairs(good)
        print(f"[armature] {len(ids)} pairs to label in {store.url}" + (f" ({refused} refused)" if refused else ""))
    elif args.action == "status":
        print(json.dumps({**store.counts(), **store.agreement(), "annotators": store.annotators()}, indent=2))
    elif args.action == "export":
        n = store.export(args.out, min_labels=args.min_labels)
        print(f"[armature] {n} labeled pairs written to {args.out}")
    return 0
