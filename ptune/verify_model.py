"""Check a model folder's files before (or instead of) loading it.

    python -m ptune.verify_model <dir>          # sizes, file structure, remembered hashes
    python -m ptune.verify_model <dir> --full   # SHA-256 of every weight file now

Expected values come from ``--manifest FILE``, else a ``ptune_manifest.json`` in the folder, else a
bundled manifest matched by the folder's config.json (the published hashes of THUDM/chatglm2-6b).
Exit status 0 when every file passes, 1 when one fails (or there are none), 2 when the folder or the manifest
cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ptune.chatglm import integrity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptune.verify_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="model folder")
    parser.add_argument("--full", action="store_true", help="hash every weight file now (slow for large models)")
    parser.add_argument("--manifest", type=Path, help="JSON manifest with the expected sha256/size per file")
    args = parser.parse_args(argv)

    if not args.path.is_dir():
        print(f"error: {args.path} is not a folder", file=sys.stderr)
        return 2
    level = "full" if args.full else "size"
    try:
        manifest = integrity.read_model_manifest(args.manifest) if args.manifest else None
        checks = integrity.verify_dir(args.path, level=level, manifest=manifest)
        used = manifest or integrity.find_manifest(args.path)
    except integrity.IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.path}: {'manifest ' + str(used.get('name')) if used else 'no manifest for this model'}"
          f" (check: {'SHA-256 of every file' if args.full else 'size and structure; hashes remembered from earlier checks'})")
    if not checks:
        print("no weight files found")
        return 1
    print(integrity.format_table(checks))
    bad = [c for c in checks if c.failed]
    if bad:
        fix = (used or {}).get("how_to_fix", "download the file again")
        print(f"\n{len(bad)} file(s) failed: {', '.join(c.name for c in bad)}. {fix[0].upper() + fix[1:]} "
              "-- only those files.")
        return 1
    unhashed = [c for c in checks if c.expected_sha256 and not c.sha256]
    if unhashed:
        print(f"\nquick check passed; {len(unhashed)} file(s) not hashed yet: run with --full to check their SHA-256.")
    else:
        print("\nall files passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
