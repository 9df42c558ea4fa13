"""`d2c results OUT SYSTEM...`: the results table of an experiment, one row per system.

A system is a `d2c sample` output folder that `d2c fid` has scored: its `manifest.json` says the mode and
which models made it (with their parameter counts), `metrics.json` holds the numbers, and the training
runs the models came from give the budget (steps, and minutes summed from their `metrics.jsonl`).
Nothing is recomputed here: the table is what those files say, written as `results.md`, `results.json`
and a picture `results.png` (a few classes x samples per system, upscaled so a person can see them).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from d2ctool.checks import check_array
from d2ctool.errors import UserError
from d2ctool.evaluation.features import extractor_label
from d2ctool.evaluation.frontier import read_points, render_frontier
from d2ctool.io import json_text, read_json_object, read_npz, write_files
from d2ctool.runstate import lock_output

STAGES = ("stage1", "stage2")
COLUMNS = ("FID", "KID", "sFID", "precision", "recall", "IS", "images/s", "stage-1 params", "stage-2 params",
           "stage-1 steps (min)", "stage-2 steps (min)")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: {what}")
    return read_json_object(path, f"re-run the command that wrote it ({what})")


def _field(obj: dict, key: str, types: tuple, path: Path, remedy: str, optional: bool = True):
    """obj[key] checked to be one of `types` (or absent/None when optional), a finite number when a number."""
    value = obj.get(key)
    if value is None and optional:
        return None
    numeric = float in types or int in types
    ok = isinstance(value, types) and not isinstance(value, bool) if numeric else isinstance(value, types)
    if not ok or (numeric and not math.isfinite(value)):
        expected = " or ".join(t.__name__ for t in types)
        raise UserError(f"{path}: '{key}' must be {'a finite ' if numeric else 'a '}{expected}, got {value!r:.60}; "
                        f"{remedy}")
    return value


def training_budget(checkpoint: str | None) -> dict | None:
    """Steps and wall minutes of the training run a checkpoint came from (None for an official file).

    A last line cut short by a killed run is skipped; any other line that is not a step record is an error."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    log = run_dir / "metrics.jsonl" if run_dir is not None else None
    if log is None or not log.is_file():
        return None
    remedy = "it is a `d2c train-*` run's log: restore it or remove the damaged line"
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{log}: not a text file; {remedy}") from None
    lines = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            if n == lines[-1][0]:
                continue  # a killed run's last line, cut short
            raise UserError(f"{log}: line {n} is not JSON; {remedy}") from None
        if not isinstance(record, dict):
            raise UserError(f"{log}: line {n} is not a JSON object; {remedy}")
        _field(record, "step", (int,), log, remedy, optional=False)
        _field(record, "seconds", (int, float), log, remedy)
        records.append(record)
    if not records:
        return None
    seconds = sum(r.get("seconds") or 0.0 for r in records)
    return {"run": str(run_dir), "steps": records[-1]["step"], "minutes": round(seconds / 60, 2)}


METRICS = {"fid": (int, float), "kid": (int, float), "sfid": (int, float), "precision": (int, float),
           "recall": (int, float), "inception_score": (int, float), "num_samples": (int,)}


def check_scored_samples(name: str, folder: Path, metrics: dict) -> None:
    """Refuse a row whose metrics were computed on other images than the folder holds now (e.g. re-sampled
    after `d2c fid` ran): the numbers would belong to old samples."""
    from d2ctool.evaluation.inputs import FolderImages
    from d2ctool.identity import file_sha256, short

    scored = metrics.get("samples") if isinstance(metrics.get("samples"), dict) else {}
    npz, images = folder / "samples.npz", folder / "images"
    current = (npz, file_sha256(npz)) if scored.get("kind") == "npz" and npz.is_file() else \
        (images, FolderImages(images).content_sha256()) if scored.get("kind") == "folder" and images.is_dir() else None
    if current is None or scored.get("content_sha256") != current[1]:
        now = f"{current[0]} has sha256 {short(current[1])}" if current is not None else \
            f"{folder} has no {'samples.npz' if scored.get('kind') == 'npz' else 'images/'}"
        raise UserError(f"results: row {name}: {folder / 'metrics.json'} was computed on samples with sha256 "
                        f"{short(scored.get('content_sha256'))} ({scored.get('path')}), but {now}; re-run "
                        f"`d2c fid {folder} --ref REF` to score the current samples")


def system_row(name: str, folder: str | Path) -> dict:
    """One row: the metrics, speed, sizes and training budget of one scored sample folder, every field checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"system {name}: {folder} is not a folder (a `d2c sample` output scored by `d2c fid`)")
    manifest_path, metrics_path = folder / "manifest.json", folder / "metrics.json"
    manifest = _read_json(manifest_path, f"is {folder} a finished `d2c sample` output?")
    metrics = _read_json(metrics_path, f"run `d2c fid {folder} --ref REF` first")
    from d2ctool.sampling.run import FORMAT as SAMPLES_FORMAT

    again = "re-run `d2c sample` into a new folder"
    if manifest.get("format") != SAMPLES_FORMAT:
        raise UserError(f"{manifest_path}: not a `d2c sample` manifest (format {manifest.get('format')!r}); {again}")
    _field(manifest, "mode", (str,), manifest_path, again, optional=False)
    _field(manifest, "images_per_second", (int, float), manifest_path, again)
    loaded = _field(manifest, "loaded", (dict,), manifest_path, again) or {}
    for stage in STAGES:
        if stage in loaded:
            record = _field(loaded, stage, (dict,), manifest_path, again, optional=False)
            _field(record, "parameters", (int,), manifest_path, again)
            _field(record, "checkpoint", (str,), manifest_path, again)
    rescore = f"re-run `d2c fid` on {folder}"
    values = {key: _field(metrics, key, types, metrics_path, rescore) for key, types in METRICS.items()}
    check_scored_samples(name, folder, metrics)
    extractor = _field(metrics, "extractor", (dict,), metrics_path, rescore) or {}
    reference = _field(metrics, "reference", (dict,), metrics_path, rescore) or {}
    return {
        "system": name, "mode": manifest["mode"], "folder": str(folder), **values,
        "images_per_second": manifest.get("images_per_second"),
        "parameters": {stage: loaded[stage].get("parameters") for stage in STAGES if stage in loaded},
        "training": {stage: training_budget(loaded[stage].get("checkpoint")) for stage in STAGES if stage in loaded},
        "extractor": extractor,
        "reference": reference.get("path"),
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _millions(count) -> str:
    return "—" if count is None else f"{count / 1e6:.2f}M"


def _budget(b) -> str:
    return "—" if not b else f"{b['steps']} ({b['minutes']:.1f})"


def markdown_table(rows: list[dict], title: str) -> str:
    extractors = {extractor_label(r["extractor"]) for r in rows}
    refs = {r["reference"] for r in rows}
    lines = [f"# {title}", "",
             f"Metrics: {' / '.join(sorted(extractors))}; reference {', '.join(sorted(map(str, refs)))}; "
             f"{', '.join(sorted({str(r['num_samples']) for r in rows}))} samples per system.", "",
             "| system | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        p, t = r["parameters"], r["training"]
        cells = [_fmt(r["fid"], ".1f"), _fmt(r.get("kid"), ".4f"), _fmt(r["sfid"], ".1f"),
                 _fmt(r["precision"], ".3f"), _fmt(r["recall"], ".3f"),
                 _fmt(r["inception_score"], ".2f"), _fmt(r["images_per_second"], ".1f"),
                 _millions(p.get("stage1")), _millions(p.get("stage2")),
                 _budget(t.get("stage1")), _budget(t.get("stage2"))]
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sample_labels(folder: Path) -> np.ndarray:
    """The labels of a sample folder's samples.npz: integers, one per image."""
    path = folder / "samples.npz"
    if not path.is_file():
        raise UserError(f"{path} not found: is {folder} a finished `d2c sample` output?")
    labels = read_npz(path, ["labels"], "re-run `d2c sample` into a new folder").get("labels")
    if labels is None:
        raise UserError(f"{path}: no 'labels' array; re-run `d2c sample` into a new folder")
    return check_array(labels, f"{path}: labels", kinds="iu", ndim=1, remedy="re-run `d2c sample` into a new folder")


def _sample_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); re-run `d2c sample` to rewrite it") \
            from None


def _label(draw: ImageDraw.ImageDraw, xy, text: str) -> None:
    draw.text(xy, text, fill=(0, 0, 0))


def results_picture(rows: list[dict], class_names: list[str] | None, classes: int = 4, per_class: int = 3,
                    min_size: int = 96) -> Image.Image:
    """Rows = systems; for the first `classes` classes, `per_class` samples each (nearest-neighbour upscaled
    to at least `min_size` px), row labels = system names, column headers = class names."""
    from d2ctool.sampling.run import image_path  # the sample folder's layout, in one place

    picked, chosen = [], None
    for r in rows:
        labels = sample_labels(Path(r["folder"]))
        if chosen is None:
            chosen = list(dict.fromkeys(labels.tolist()))[:classes]
        images = []
        for cls in chosen:
            indices = np.flatnonzero(labels == cls)[:per_class]
            images += [_sample_image(image_path(Path(r["folder"]), int(i))) for i in indices]
            images += [None] * (per_class - len(indices))
        picked.append(images)
    size = next(im.size[0] for row in picked for im in row if im is not None)
    scale = max(1, -(-min_size // size))
    cell, pad, label_w, header_h = size * scale, 4, 8 * max(len(r["system"]) for r in rows) + 12, 18
    width = label_w + len(chosen) * (per_class * (cell + pad) + 2 * pad)
    canvas = Image.new("RGB", (width, header_h + len(rows) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, cls in enumerate(chosen):
        name = class_names[cls] if class_names and cls < len(class_names) else f"class {cls}"
        _label(draw, (label_w + j * (per_class * (cell + pad) + 2 * pad), 3), name)
    for i, (r, images) in enumerate(zip(rows, picked)):
        y = header_h + i * (cell + pad)
        _label(draw, (4, y + cell // 2 - 5), r["system"])
        for k, im in enumerate(images):
            if im is None:
                continue
            j, c = divmod(k, per_class)
            x = label_w + j * (per_class * (cell + pad) + 2 * pad) + c * (cell + pad)
            canvas.paste(im.resize((cell, cell), Image.NEAREST), (x, y))
    return canvas


def write_results(out: str | Path, systems: list[tuple[str, str | Path]], class_names: list[str] | None = None,
                  title: str = "Results", frontier_sweeps: list[str | Path] = ()) -> ResultsOutcome:
    """results.md, results.json and results.png in `out`, from the scored sample folders `systems`; with
    `frontier_sweeps` (finished `d2c sweep` folders) also their joint frontier (frontier.*), appended to results.md.

    Every input is read and checked, and all three files are rendered, before anything is written; they are
    then written as one set under the output lock. The same set already there is left alone (nothing to do,
    also on a read-only mount)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; give a folder for results.md, .json and .png")
    if not systems:
        raise UserError("give at least one scored sample folder")
    names = [name for name, _ in systems]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or any(not n.strip() for n in names):
        raise UserError(f"system names must be unique and not empty (repeated: {', '.join(repeated) or 'none'})")
    rows = [system_row(name, folder) for name, folder in systems]
    points = [p for sweep in frontier_sweeps for p in read_points(sweep)]
    buf = io.BytesIO()
    results_picture(rows, class_names).save(buf, format="PNG")
    files = {"results.json": (json_text({"title": title, "rows": rows}, out / "results.json") + "\n").encode(),
             "results.md": markdown_table(rows, title).encode(), "results.png": buf.getvalue()}
    if points:
        frontier_files = render_frontier(points, f"Speed-quality frontier ({title})")
        files["results.md"] += b"\n" + frontier_files["frontier.md"].replace(b"# Speed", b"## Speed", 1)
        files.update(frontier_files)
    if all((out / name).is_file() and (out / name).read_bytes() == data for name, data in files.items()):
        return ResultsOutcome(rows, already_complete=True)
    lock_output(out)
    write_files(out, files)
    return ResultsOutcome(rows)


@dataclass
class ResultsOutcome:
    rows: list[dict]
    already_complete: bool = False
