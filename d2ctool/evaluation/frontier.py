"""The speed-quality frontier: FID against images/s of sweep points (`d2c sweep`), per system.

A point's row comes from its folder: the sample manifest, `metrics.json` (`d2c fid`) and `timing.json`
(measured in the sweep's process). Points whose settings differ only in `seed` are one setting: its FID and
images/s are their means, and their seed-to-seed spread is reported. A setting is on the Pareto front when
no other has both a lower-or-equal FID and a higher-or-equal speed (one strictly); the front is marked per
system and across systems. FIDs are only put side by side when they share the reference, the sample
count and the feature network; otherwise the pair is refused, both sides named.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from pathlib import Path

from PIL import Image, ImageDraw

from d2ctool.errors import UserError
from d2ctool.io import write_bytes

FORMAT = "d2c-frontier"
# short names of settings in plot labels (others: the setting's last part)
SHORT = {"stage2.num_iter": "it", "stage2.sampler": "", "stage2.num_sampling_steps": "n", "stage1.cfg_scale": "cfg1=",
         "stage2.cfg_scale": "cfg2=", "stage2.cfg_schedule": "", "stage1.top_k": "k=", "stage2.temperature": "T="}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _read(path: Path, remedy: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: {remedy}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); {remedy}") from None


def point_row(system: str, settings: dict, folder: str | Path, seed: int | None = None) -> dict:
    """One measured point (sampled with `seed`): FID, speed and its split, and what the FID is comparable on."""
    folder = Path(folder)
    again = "run the same `d2c sweep` again to finish the point"
    manifest = _read(folder / "manifest.json", again)
    metrics = _read(folder / "metrics.json", again)
    timing = _read(folder / "timing.json", again)
    ref, ext = metrics.get("reference") or {}, metrics.get("extractor") or {}
    return {"system": system, "mode": manifest.get("mode"), "settings": dict(settings), "seed": seed,
            "folder": str(folder),
            "fid": metrics.get("fid"), "num_samples": metrics.get("num_samples"),
            "images_per_second": timing.get("images_per_second"),
            "seconds_per_image": timing.get("seconds_per_image", {}),
            "threads": timing.get("threads"), "device": timing.get("device"),
            "reference": ref.get("sha256") or ref.get("content_sha256") or ref.get("path"),
            "reference_path": ref.get("path"),
            "extractor": {k: ext.get(k) for k in ("name", "mode", "weights_sha256", "random_seed")},
            "extractor_summary": ext.get("summary")}


def check_comparable(rows: list[dict]) -> None:
    """Refuse FIDs scored against another reference, sample count or feature network, naming both sides."""
    first = rows[0]
    for r in rows[1:]:
        for what, key in (("reference", "reference"), ("sample count", "num_samples"), ("feature network", "extractor")):
            if r[key] != first[key]:
                def side(x):
                    shown = x["reference_path"] if key == "reference" else x[key]
                    return f"{x['system']} {short_label(x['settings']) or 'default'} ({x['folder']}: {what} {shown})"

                raise UserError(f"frontier: the FIDs of {side(first)} and {side(r)} are not comparable (different "
                                f"{what}); score every point with the same reference, sample count and network")


def short_label(settings: dict) -> str:
    parts = []
    for key, value in settings.items():
        if key == "seed":
            continue
        prefix = SHORT.get(key, key.rsplit(".", 1)[-1] + "=")
        parts.append(f"{prefix}{value}")
    return " ".join(parts)


def group_seeds(rows: list[dict]) -> list[dict]:
    """Rows that differ only in `seed` -> one setting with mean FID and images/s, and the per-seed FIDs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["system"], tuple(sorted((k, v) for k, v in r["settings"].items() if k != "seed")))
        groups.setdefault(key, []).append(r)
    settings = []
    for (system, _), members in groups.items():
        items = [(k, v) for k, v in members[0]["settings"].items() if k != "seed"]  # in the grid's order
        fids = [m["fid"] for m in members]
        speeds = [m["images_per_second"] for m in members]
        split = {part: statistics.fmean(m["seconds_per_image"].get(part, 0.0) for m in members)
                 for part in members[0]["seconds_per_image"]}
        settings.append({"system": system, "mode": members[0]["mode"], "settings": dict(items),
                         "label": short_label(dict(items)) or "default", "fid": statistics.fmean(fids),
                         "images_per_second": statistics.fmean(speeds), "seconds_per_image": split,
                         "seeds": [m["seed"] for m in members], "fid_per_seed": fids,
                         "folders": [m["folder"] for m in members]})
    return settings


def _dominated(p: dict, others: list[dict]) -> bool:
    return any(q["fid"] <= p["fid"] and q["images_per_second"] >= p["images_per_second"]
               and (q["fid"] < p["fid"] or q["images_per_second"] > p["images_per_second"]) for q in others)


def reaches(settings: list[dict]) -> list[dict]:
    """For every ordered pair of systems (A, B): the fastest setting of A whose FID is at most B's best FID, and
    its images/s against those of B's best setting (the question "what does A need to match B, and how fast")."""
    systems = list(dict.fromkeys(s["system"] for s in settings))
    best = {b: min((s for s in settings if s["system"] == b), key=lambda s: s["fid"]) for b in systems}
    out = []
    for a in systems:
        for b in systems:
            target = best[b]
            hits = [s for s in settings if s["system"] == a and s["fid"] <= target["fid"]]
            fastest = max(hits, key=lambda s: s["images_per_second"]) if hits else None
            out.append({"system": a, "target": b, "target_label": target["label"], "target_fid": target["fid"],
                        "target_images_per_second": target["images_per_second"],
                        "label": fastest["label"] if fastest else None, "fid": fastest["fid"] if fastest else None,
                        "images_per_second": fastest["images_per_second"] if fastest else None,
                        "speedup": fastest["images_per_second"] / target["images_per_second"] if fastest else None})
    return out


def frontier(rows: list[dict]) -> dict:
    """Settings with their Pareto marks (per system, across systems), who reaches whose best FID, and the
    seed-to-seed spread."""
    if not rows:
        raise UserError("frontier: no finished points")
    check_comparable(rows)
    settings = group_seeds(rows)
    for s in settings:
        same = [o for o in settings if o["system"] == s["system"] and o is not s]
        s["pareto"] = not _dominated(s, same)
        s["pareto_all"] = not _dominated(s, [o for o in settings if o is not s])
    spread = [{"system": s["system"], "label": s["label"], "seeds": s["seeds"], "fid_per_seed": s["fid_per_seed"],
               "std": statistics.stdev(s["fid_per_seed"]),
               "range": max(s["fid_per_seed"]) - min(s["fid_per_seed"])}
              for s in settings if len(s["fid_per_seed"]) > 1]
    first = rows[0]
    return {"format": FORMAT, "version": 1, "num_samples": first["num_samples"], "reference": first["reference_path"],
            "extractor": first["extractor_summary"], "threads": sorted({r["threads"] for r in rows if r["threads"]}),
            "devices": sorted({r["device"] for r in rows if r["device"]}),
            "settings": sorted(settings, key=lambda s: (s["system"], -s["images_per_second"])),
            "reaches": reaches(settings), "seed_spread": spread, "points": rows}


def _ms(split: dict, part: str) -> str:
    return f"{1000 * split[part]:.1f}" if part in split else "—"


def frontier_markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", "",
             f"FID ({result['extractor']}) of {result['num_samples']} samples against {result['reference']}; "
             f"images/s measured in the sweep's process ({', '.join(result['devices'])}, "
             f"{'/'.join(map(str, result['threads']))} thread(s)), warm-up excluded. "
             "Pareto: no other setting is both faster and better; * per system, ** across systems.", ""]
    for s in result["seed_spread"]:
        lines.append(f"Seed-to-seed spread of FID at {s['system']} {s['label']}: std {s['std']:.1f}, range "
                     f"{s['range']:.1f} over seeds {', '.join(map(str, s['seeds']))} "
                     f"({', '.join(f'{f:.1f}' for f in s['fid_per_seed'])}).")
    if not result["seed_spread"]:
        lines.append("Seed-to-seed spread: not measured (no setting was run with more than one seed).")
    lines += ["", "| system | settings | FID | images/s | ms/image stage 1 | stage 2 | decode | Pareto |",
              "|---|---|---|---|---|---|---|---|"]
    for s in result["settings"]:
        mark = "**" if s["pareto_all"] else "*" if s["pareto"] else ""
        seeds = f" (mean of {len(s['seeds'])} seeds)" if len(s["seeds"]) > 1 else ""
        split = s["seconds_per_image"]
        lines.append(f"| {s['system']} | {s['label']} | {s['fid']:.1f}{seeds} | {s['images_per_second']:.1f} | "
                     f"{_ms(split, 'stage1')} | {_ms(split, 'stage2')} | {_ms(split, 'decode')} | {mark} |")
    front = sorted((s for s in result["settings"] if s["pareto_all"]), key=lambda s: s["images_per_second"])
    lines += ["", "Across systems, slowest to fastest: "
              + "; ".join(f"{s['system']} {s['label']} (FID {s['fid']:.1f}, {s['images_per_second']:.1f} images/s)"
                          for s in front) + "."]
    return "\n".join(lines + _reach_lines(result)) + "\n"


def _reach_lines(result: dict) -> list[str]:
    """The `reaches` matrix: a row per system, a column per system's best FID."""
    pairs = result.get("reaches") or []
    systems = list(dict.fromkeys(r["target"] for r in pairs))
    if len(systems) < 2:
        return []
    best = {r["target"]: r for r in pairs}
    lines = ["", "Matching each system's best FID: the row system's fastest setting with an FID at or below the "
             "column system's best, as images/s and × the speed of that best setting (— never reaches it).", "",
             "| system | " + " | ".join(f"{b} best: {best[b]['target_fid']:.1f} ({best[b]['target_label']}, "
                                        f"{best[b]['target_images_per_second']:.1f}/s)" for b in systems) + " |",
             "|---" * (len(systems) + 1) + "|"]
    for a in systems:
        cells = []
        for b in systems:
            (r,) = [r for r in pairs if r["system"] == a and r["target"] == b]
            cells.append("—" if r["label"] is None else
                         f"{r['images_per_second']:.1f}/s ({r['speedup']:.2f}×), {r['label']}, FID {r['fid']:.1f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def frontier_picture(result: dict, width: int = 960, height: int = 640) -> Image.Image:
    """FID (y) against images/s (x, log scale); one colour and curve (its Pareto front) per system; filled
    markers on the system's front, hollow ones elsewhere; each point labelled with its settings."""
    settings = result["settings"]
    left, right, top, bottom = 70, 190, 40, 60
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs = [math.log10(s["images_per_second"]) for s in settings]
    ys = [s["fid"] for s in settings]
    x0, x1 = math.floor(min(xs) * 4) / 4, math.ceil(max(xs) * 4) / 4
    x1 = x1 if x1 > x0 else x0 + 0.25
    pad = max((max(ys) - min(ys)) * 0.08, 1.0)
    y0, y1 = min(ys) - pad, max(ys) + pad

    def px(s: dict) -> tuple[float, float]:
        x = left + (math.log10(s["images_per_second"]) - x0) / (x1 - x0) * (width - left - right)
        y = top + (y1 - s["fid"]) / (y1 - y0) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for e in range(math.floor(x0), math.ceil(x1) + 1):  # log-scale ticks at 1, 2, 5 x 10^e
        for m in (1, 2, 5):
            v = math.log10(m) + e
            if x0 <= v <= x1:
                x = left + (v - x0) / (x1 - x0) * (width - left - right)
                draw.line([x, height - bottom, x, height - bottom + 5], fill=(0, 0, 0))
                draw.text((x - 8, height - bottom + 8), f"{m * 10.0 ** e:g}", fill=(0, 0, 0))
    for k in range(6):
        v = y0 + (y1 - y0) * k / 5
        y = top + (y1 - v) / (y1 - y0) * (height - top - bottom)
        draw.line([left - 5, y, left, y], fill=(0, 0, 0))
        draw.text((8, y - 6), f"{v:.1f}", fill=(0, 0, 0))
    draw.text(((width - right + left) // 2 - 60, height - 28), "images/s (log scale)", fill=(0, 0, 0))
    draw.text((8, 12), "FID (lower is better)", fill=(0, 0, 0))
    systems = list(dict.fromkeys(s["system"] for s in settings))
    for i, system in enumerate(systems):
        colour = PALETTE[i % len(PALETTE)]
        mine = [s for s in settings if s["system"] == system]
        front = sorted((s for s in mine if s["pareto"]), key=lambda s: s["images_per_second"])
        if len(front) > 1:
            draw.line([px(s) for s in front], fill=colour, width=2)
        for s in mine:
            x, y = px(s)
            r = 5
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2,
                         fill=colour if s["pareto"] else (255, 255, 255))
            if s["pareto_all"]:
                draw.ellipse([x - r - 3, y - r - 3, x + r + 3, y + r + 3], outline=(0, 0, 0))
            draw.text((x + 7, y - 12), s["label"], fill=colour)
        ly = top + 16 * i
        draw.rectangle([width - right + 12, ly + 3, width - right + 22, ly + 13], fill=colour)
        draw.text((width - right + 28, ly + 2), system, fill=(0, 0, 0))
    ly = top + 16 * len(systems) + 8
    draw.text((width - right + 12, ly), "filled: system's front", fill=(0, 0, 0))
    draw.text((width - right + 12, ly + 14), "ringed: front of all", fill=(0, 0, 0))
    return canvas


def render_frontier(rows: list[dict], title: str = "Frontier") -> dict[str, bytes]:
    """frontier.json, frontier.md and frontier.png, rendered (nothing written)."""
    result = frontier(rows)
    buf = io.BytesIO()
    frontier_picture(result).save(buf, format="PNG")
    return {"frontier.json": (json.dumps({"title": title, **result}, indent=1) + "\n").encode(),
            "frontier.md": frontier_markdown(result, title).encode(), "frontier.png": buf.getvalue()}


def write_frontier(out: str | Path, rows: list[dict], title: str = "Frontier") -> None:
    """frontier.json, frontier.md and frontier.png in `out`."""
    files = render_frontier(rows, title)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_bytes(out / name, data)


def read_points(sweep: str | Path) -> list[dict]:
    """The measured points of a finished sweep folder (its frontier.json)."""
    data = _read(Path(sweep) / "frontier.json", "is it a finished `d2c sweep` output? run the sweep first")
    if data.get("format") != FORMAT:
        raise UserError(f"{Path(sweep) / 'frontier.json'} is not a d2c frontier file (format {data.get('format')!r})")
    return data["points"]
