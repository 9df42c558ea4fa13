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
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from d2ctool.errors import UserError
from d2ctool.evaluation.features import extractor_label
from d2ctool.io import write_bytes, write_json, write_text

STAGES = ("stage1", "stage2")
COLUMNS = ("FID", "sFID", "precision", "recall", "IS", "images/s", "stage-1 params", "stage-2 params",
           "stage-1 steps (min)", "stage-2 steps (min)")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); re-run the command that wrote it") from None


def training_budget(checkpoint: str | None) -> dict | None:
    """Steps and wall minutes of the training run a checkpoint came from (None for an official file)."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    log = run_dir / "metrics.jsonl" if run_dir is not None else None
    if log is None or not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not records:
        return None
    seconds = sum(r.get("seconds", 0.0) for r in records)
    return {"run": str(run_dir), "steps": records[-1]["step"], "minutes": round(seconds / 60, 2)}


def system_row(name: str, folder: str | Path) -> dict:
    """One row: the metrics, speed, sizes and training budget of one scored sample folder."""
    folder = Path(folder)
    manifest = _read_json(folder / "manifest.json", f"is {folder} a finished `d2c sample` output?")
    metrics = _read_json(folder / "metrics.json", f"run `d2c fid {folder / 'samples.npz'} --ref REF` first")
    loaded = manifest.get("loaded", {})
    return {
        "system": name, "mode": manifest.get("mode"), "folder": str(folder),
        "fid": metrics.get("fid"), "sfid": metrics.get("sfid"), "precision": metrics.get("precision"),
        "recall": metrics.get("recall"), "inception_score": metrics.get("inception_score"),
        "num_samples": metrics.get("num_samples"), "images_per_second": manifest.get("images_per_second"),
        "parameters": {stage: loaded[stage].get("parameters") for stage in STAGES if stage in loaded},
        "training": {stage: training_budget(loaded[stage].get("checkpoint")) for stage in STAGES if stage in loaded},
        "extractor": metrics.get("extractor", {}),
        "reference": metrics.get("reference", {}).get("path"),
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
        cells = [_fmt(r["fid"], ".1f"), _fmt(r["sfid"], ".1f"), _fmt(r["precision"], ".3f"), _fmt(r["recall"], ".3f"),
                 _fmt(r["inception_score"], ".2f"), _fmt(r["images_per_second"], ".1f"),
                 _millions(p.get("stage1")), _millions(p.get("stage2")),
                 _budget(t.get("stage1")), _budget(t.get("stage2"))]
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(draw: ImageDraw.ImageDraw, xy, text: str) -> None:
    draw.text(xy, text, fill=(0, 0, 0))


def results_picture(rows: list[dict], class_names: list[str] | None, classes: int = 4, per_class: int = 3,
                    min_size: int = 96) -> Image.Image:
    """Rows = systems; for the first `classes` classes, `per_class` samples each (nearest-neighbour upscaled
    to at least `min_size` px), row labels = system names, column headers = class names."""
    from d2ctool.sampling.run import image_path  # the sample folder's layout, in one place

    picked, chosen = [], None
    for r in rows:
        labels = np.load(Path(r["folder"]) / "samples.npz")["labels"]
        if chosen is None:
            chosen = list(dict.fromkeys(labels.tolist()))[:classes]
        images = []
        for cls in chosen:
            indices = np.flatnonzero(labels == cls)[:per_class]
            images += [Image.open(image_path(Path(r["folder"]), int(i))).convert("RGB") for i in indices]
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
                  title: str = "Results", frontier_sweeps: list[str | Path] = ()) -> list[dict]:
    """results.md, results.json and results.png in `out`, from the scored sample folders `systems`; with
    `frontier_sweeps` (finished `d2c sweep` folders) also their joint frontier (frontier.*), appended to results.md."""
    from d2ctool.evaluation.frontier import read_points, write_frontier

    if not systems:
        raise UserError("give at least one scored sample folder")
    rows = [system_row(name, folder) for name, folder in systems]
    points = [p for sweep in frontier_sweeps for p in read_points(sweep)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows, title)
    if points:
        write_frontier(out, points, f"Speed-quality frontier ({title})")
        text += "\n" + (out / "frontier.md").read_text().replace("# Speed", "## Speed", 1)
    write_json(out / "results.json", {"title": title, "rows": rows})
    write_text(out / "results.md", text)
    buf = io.BytesIO()
    results_picture(rows, class_names).save(buf, format="PNG")
    write_bytes(out / "results.png", buf.getvalue())
    return rows
