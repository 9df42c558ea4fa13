"""Where `prepare` finds images: a class-per-folder tree, a flat folder with a labels file, or `synthetic`.

A source is scanned into a sorted list of items (relative path or synthetic index, class index) and
the class names in index order. Scanning only lists files; decoding happens later, in parallel.

Rules (also in docs/data.md):
- Class folders are the non-hidden sub-folders of the root, in sorted order: ImageNet's wnids get the
  standard indices 0..999. Files anywhere below a class folder belong to it.
- Hidden files and folders (names starting with '.') are ignored. Symbolic links are followed, to
  files and to folders, each real folder visited once; a link to nothing, and a link to the source
  folder, one of its ancestors or into another class's folder, are listed as rejected (not followed).
- A file or folder name that is not valid UTF-8 is listed as rejected (its bytes shown as \\xNN).
- Only regular files are read: FIFOs, sockets and devices are listed as rejected and never opened
  (opening a FIFO would block forever).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from d2ctool.data import synthetic
from d2ctool.data.config import PrepareConfig
from d2ctool.errors import UserError
from d2ctool.io import read_json_object

SYNTHETIC = "synthetic"


@dataclass
class Source:
    kind: str  # "folder", "flat" or "synthetic"
    root: str | None  # absolute path of the scanned folder
    classes: list[str]
    refs: list  # relative paths (str) or synthetic indices (int), sorted
    labels: list[int]
    rejected: list[dict] = field(default_factory=list)  # found while scanning: {"path", "reason"}

    def fingerprint(self) -> dict:
        """What identifies this source's content listing: a different one gives different shards."""
        listing = "\n".join(f"{r}\t{l}" for r, l in zip(self.refs, self.labels))
        return {"kind": self.kind, "root": self.root, "num_items": len(self.refs), "classes": len(self.classes),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _safe_name(rel: str) -> str | None:
    """None when `rel` is valid UTF-8 text, else a printable stand-in (bad bytes as \\xNN) for rejected.jsonl."""
    try:
        rel.encode("utf-8")
        return None
    except UnicodeEncodeError:  # os.walk gives undecodable bytes as surrogates
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_files(root: Path, top: Path, rejected: list[dict], seen: set[str] | None = None,
                other_classes: tuple[str, ...] = ()) -> list[str]:
    """Every non-hidden file below `top`, as paths relative to `root`, following links without cycles.

    A real folder is read once (`seen` is shared by the class folders of one tree). A link to the tree's root or
    one of its ancestors, or into another class's folder (real paths in `other_classes`), is not followed, so
    no image is reached from two classes; a name that is not valid UTF-8 is rejected, not fatal.
    """
    found, seen = [], set() if seen is None else seen
    real_root = os.path.realpath(root)

    def onerror(err: OSError):
        rel = os.path.relpath(err.filename, root)
        rejected.append({"path": _safe_name(rel) or rel, "reason": f"unreadable folder: {err.strerror}"})

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=onerror):
        real = os.path.realpath(dirpath)
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        if real in seen:  # a link back into the tree, or a folder another link reached first
            dirnames[:] = []
            continue
        if dirpath != str(top) and (_inside(real_root, real) or any(_inside(real, c) for c in other_classes)):
            reason = ("a link to the source folder or one of its ancestors" if _inside(real_root, real)
                      else "a link into another class's folder")
            rejected.append({"path": _safe_name(rel_dir) or rel_dir, "reason": f"{reason}: not followed"})
            dirnames[:] = []
            continue
        seen.add(real)
        if _safe_name(rel_dir) is not None:
            rejected.append({"path": _safe_name(rel_dir), "reason": "folder name is not valid UTF-8 text: not read; "
                                                                   "rename it"})
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            if _hidden(name):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if _safe_name(rel) is not None:
                rejected.append({"path": _safe_name(rel), "reason": "file name is not valid UTF-8 text: not read; "
                                                                    "rename it"})
                continue
            try:
                mode = os.stat(path).st_mode  # follows links
            except OSError as e:
                reason = "broken symbolic link" if os.path.islink(path) else f"unreadable: {e.strerror}"
                rejected.append({"path": rel, "reason": reason})
                continue
            if stat.S_ISREG(mode):
                found.append(rel)
            else:
                rejected.append({"path": rel, "reason": f"not a regular file ({_file_kind(mode)}): not opened"})
    return found


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "special file"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


def _class_order(names: set[str], classes_file: str | None) -> list[str]:
    """Sorted names, or the order fixed by a classes file (a text list or a prepare manifest.json)."""
    if classes_file is None:
        return sorted(names)
    path = Path(classes_file)
    if not path.is_file():
        raise UserError(f"classes file not found: {path} (prepare.classes: a text file with one class name "
                        "per line, or the manifest.json of another prepare output)")
    if path.suffix == ".json":
        order = read_json_object(path, "give a prepare manifest.json or a text file of class names").get("classes")
        if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
            raise UserError(f"{path}: not a prepare manifest (no 'classes' list of names)")
    else:
        order = [line.strip() for line in _read_text(path).splitlines() if line.strip() and not line.startswith("#")]
    if len(set(order)) != len(order):
        raise UserError(f"{path}: lists a class name twice")
    unknown = sorted(names - set(order))
    if unknown:
        raise UserError(f"{len(unknown)} class(es) not in {path}: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}; add them or fix the labels/folders")
    return order


def scan_folder_tree(root: Path, cfg: PrepareConfig) -> Source:
    entries = sorted((e for e in os.scandir(root) if not _hidden(e.name)), key=lambda e: e.name)
    undecodable = [e for e in entries if _safe_name(e.name) is not None]  # no class name can hold them
    entries = [e for e in entries if _safe_name(e.name) is None]
    class_dirs = [e.name for e in entries if e.is_dir()]
    if not class_dirs:
        raise UserError(f"{root} has no class folders. A class-per-folder tree is ROOT/<class>/<image>; "
                        "for a flat folder (e.g. ImageNet val) give a labels file: --set prepare.labels=FILE")
    train = root / "train"
    if "train" in class_dirs and train.is_dir() and any(e.is_dir() for e in os.scandir(train)):
        raise UserError(f"{root} looks like a data set root (train/ holds class folders): pass {train} instead")
    classes = _class_order(set(class_dirs), cfg.classes)
    index = {name: i for i, name in enumerate(classes)}
    rejected: list[dict] = []
    refs, labels = [], []
    real_classes = {name: os.path.realpath(root / name) for name in class_dirs}
    seen: set[str] = set()
    for name in class_dirs:
        others = tuple(real for real in real_classes.values() if real != real_classes[name])
        files = _walk_files(root, root / name, rejected, seen, others)
        refs.extend(files)
        labels.extend([index[name]] * len(files))
    rejected += [{"path": e.name, "reason": "file outside any class folder"} for e in entries if e.is_file()]
    rejected += [{"path": _safe_name(e.name), "reason": "name is not valid UTF-8 text: not read; rename it"}
                 for e in undecodable]
    order = sorted(range(len(refs)), key=refs.__getitem__)
    return Source("folder", str(root.resolve()), classes, [refs[i] for i in order], [labels[i] for i in order],
                  sorted(rejected, key=lambda r: r["path"]))


def read_labels_file(path: Path) -> dict[str, str]:
    """Map file name (or stem) -> class name. See docs/data.md for the two accepted formats."""
    if not path.is_file():
        raise UserError(f"labels file not found: {path}")
    lines = _read_text(path).splitlines()
    labels: dict[str, str] = {}
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        # Kaggle's LOC_val_solution.csv: ImageId,PredictionString ("n01751748 x0 y0 x1 y1 ...")
        for row in csv.DictReader(lines):
            tokens = (row.get("PredictionString") or "").split()
            if not tokens:
                raise UserError(f"{path}: no class for {row.get('ImageId')!r}")
            labels[row["ImageId"]] = tokens[0]
        return labels
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"[\s,]+", line)
        if len(parts) != 2:
            raise UserError(f"{path}:{number}: expected '<file name> <class name>', got {line!r}")
        labels[parts[0]] = parts[1]
    if not labels:
        raise UserError(f"{path}: no labels in it")
    return labels


def scan_flat_folder(root: Path, cfg: PrepareConfig) -> Source:
    labels_by_name = read_labels_file(Path(cfg.labels))
    rejected: list[dict] = []
    files = _walk_files(root, root, rejected)
    classes = _class_order(set(labels_by_name.values()), cfg.classes)
    index = {name: i for i, name in enumerate(classes)}
    refs, labels, used = [], [], set()
    for rel in files:
        stem = rel.rsplit(".", 1)[0]
        key = rel if rel in labels_by_name else stem if stem in labels_by_name else None
        if key is None:
            rejected.append({"path": rel, "reason": f"no label in {cfg.labels}"})
            continue
        used.add(key)
        refs.append(rel)
        labels.append(index[labels_by_name[key]])
    for name in sorted(set(labels_by_name) - used):
        rejected.append({"path": name, "reason": f"listed in {cfg.labels} but not found"})
    return Source("flat", str(root.resolve()), classes, refs, labels, sorted(rejected, key=lambda r: r["path"]))


def scan_synthetic(cfg: PrepareConfig) -> Source:
    syn = cfg.synthetic
    if syn.num_classes > synthetic.MAX_CLASSES:
        raise UserError(f"prepare.synthetic.num_classes: at most {synthetic.MAX_CLASSES}, got {syn.num_classes}")
    n = syn.num_classes * syn.images_per_class
    return Source(SYNTHETIC, None, synthetic.class_names(syn.num_classes), list(range(n)),
                  [i % syn.num_classes for i in range(n)])


def scan_source(src: str, cfg: PrepareConfig) -> Source:
    if src == SYNTHETIC:
        return scan_synthetic(cfg)
    root = Path(src)
    if not root.exists():
        raise UserError(f"source not found: {src} (a folder of images, or 'synthetic' for the built-in set)")
    if not root.is_dir():
        raise UserError(f"source is not a folder: {src}")
    source = scan_flat_folder(root, cfg) if cfg.labels else scan_folder_tree(root, cfg)
    if not source.refs:
        raise UserError(f"no image files found under {src}")
    return source
