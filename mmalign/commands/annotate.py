"""``mmalign annotate serve | export | stats``: label preferences in a browser, export them for ``train``.

    mmalign annotate serve outputs/candidates/manifest.jsonl --out labels.jsonl --overlap 2
    mmalign annotate export labels.jsonl --out pairs.jsonl [--majority]
    mmalign annotate stats labels.jsonl

See docs/annotate.md. ``serve`` needs ``pip install 'mmalign[annotate]'``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys


def access_token(host: str, token: str | None) -> str | None:
    """The token the server requires: the given one, else a generated one unless bound to loopback."""
    from mmalign.annotate.server import LOOPBACK

    if token is not None:
        if len(token) < 8 or not token.isprintable() or " " in token:
            raise ValueError("--token must be at least 8 printable characters without spaces")
        return token
    return None if host in LOOPBACK else secrets.token_urlsafe(18)


def cmd_serve(args: argparse.Namespace) -> int:
    from mmalign.annotate.items import load_items
    from mmalign.annotate.server import require_server_deps, serve
    from mmalign.annotate.store import LabelStore

    try:
        require_server_deps()
    except ImportError as err:
        print(f"mmalign annotate: {err}", file=sys.stderr)
        return 2
    try:
        token = access_token(args.host, args.token)
    except ValueError as err:
        print(f"mmalign annotate: {err}", file=sys.stderr)
        return 2
    if token is not None and args.token is None:
        print(
            f"--host {args.host} is reachable from other machines: every request needs the token {token}",
            flush=True,
        )
    if args.overlap < 1:
        print("mmalign annotate: --overlap must be >= 1", file=sys.stderr)
        return 2
    items = load_items(
        args.manifest,
        seed=args.seed,
        segment_seconds=args.segment_seconds,
        pairs_per_group=args.pairs_per_group,
        score_key=args.score_key,
    )
    store = LabelStore(
        args.out, items, overlap=args.overlap, seed=args.seed, lease_seconds=args.lease_seconds
    )
    if store.torn:
        print(
            f"{args.out}: cut off {store.torn} bytes of a label write the server never acknowledged "
            "(it was stopped mid-write)",
            flush=True,
        )
    if store.unknown_items:
        print(
            f"{args.out}: {store.unknown_items} labels refer to items not in {args.manifest} (kept, ignored here)",
            flush=True,
        )
    try:
        serve(store, host=args.host, port=args.port, token=token, rate=args.rate, max_body=args.max_body)
    except OSError as err:
        print(f"mmalign annotate: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmalign.annotate.export import export_labels

    counts = export_labels(args.labels, args.out, majority=args.majority, kind=args.kind)
    print(json.dumps({"out": args.out, **counts}))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from mmalign.annotate.export import format_stats, label_stats

    stats = label_stats(args.labels)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``annotate`` (serve, export, stats) to the ``mmalign`` parser."""
    p = subparsers.add_parser(
        "annotate",
        help="label preferences in a browser (serve), export them for train, stats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True)

    s = sub.add_parser("serve", help="start the labelling page for a pair or media manifest")
    s.add_argument(
        "manifest",
        help="pair manifest (chosen/rejected, image_0/image_1, video_0/video_1) or media "
        "manifest of candidates (path, prompt, group)",
    )
    s.add_argument("--out", required=True, help="labels JSONL (appended to; an existing file is resumed)")
    s.add_argument(
        "--overlap", type=int, default=1, help="different people who label each item (2+ for agreement)"
    )
    s.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback requires a token")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    s.add_argument(
        "--token",
        help="access token required on every request (default: none on loopback, "
        "generated and printed otherwise)",
    )
    s.add_argument("--seed", type=int, default=0, help="seeds the pairs drawn per group and the sides shown")
    s.add_argument(
        "--segment-seconds",
        type=float,
        default=1.0,
        help="video segment length when the manifest gives none (DenseDPO: 1 s)",
    )
    s.add_argument(
        "--pairs-per-group",
        type=int,
        default=0,
        help="media manifest: pairs per group (0: n//2 disjoint pairs, -1: every pair)",
    )
    s.add_argument(
        "--score-key", help="reward column kept for `annotate stats` (default: the only numeric one)"
    )
    s.add_argument(
        "--lease-seconds",
        type=float,
        default=600.0,
        help="how long an item shown to someone stays reserved for them",
    )
    s.add_argument(
        "--rate", type=float, default=100.0, help="requests per second per client address (burst 2x)"
    )
    s.add_argument("--max-body", type=int, default=65536, help="largest request body in bytes")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser(
        "export", help="labels -> training manifest (image_0/image_1/label_0 or video_0/video_1/labels)"
    )
    e.add_argument("labels")
    e.add_argument("--out", required=True, help="output JSONL for `mmalign train` (data.source)")
    e.add_argument(
        "--majority",
        action="store_true",
        help="one row per item with the majority choice; items without a majority are dropped",
    )
    e.add_argument(
        "--kind", choices=["image", "video"], help="export only image or video labels (needed when both)"
    )
    e.set_defaults(func=cmd_export)

    t = sub.add_parser(
        "stats", help="counts per person, time per item, agreement (Cohen/Fleiss), reward agreement"
    )
    t.add_argument("labels")
    t.add_argument("--json", action="store_true", help="print the statistics as JSON")
    t.set_defaults(func=cmd_stats)
