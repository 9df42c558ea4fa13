"""`d2c sweep OUT`: FID against images/s of one or more systems over a grid of sampling settings.

A system is a sampling mode and its stage-2 run (`NAME=MODE[:STAGE2]`; stage 1, tokenizers and the rest come
from the recipe's `sample` section). The grid is the product of axes, each a `sample` setting with its
values (`stage2.num_iter=1,2,4`) or tied settings (`stage2.sampler:stage2.num_sampling_steps=ddpm:25,
dpm-solver++:10`), from the recipe's `sweep.grid` or `--grid`; an axis of a stage the system's mode does
not run is left out for it. Each point is an ordinary `d2c sample` folder, OUT/SYSTEM/POINT, scored by
`d2c fid` (metrics.json) and timed in this process (timing.json: warm-up excluded, stage 1, stage 2 and
decoding apart). Each step is skipped when done, so a re-run resumes and a larger grid runs only its new
points. Every point is checked before any work; the frontier (frontier.json/.md/.png) is written last.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from d2ctool.errors import UserError
from d2ctool.io import write_json
from d2ctool.progress import info

SYSTEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Axis:
    keys: tuple[str, ...]  # `sample` settings, e.g. ("stage2.sampler", "stage2.num_sampling_steps")
    values: tuple[tuple[str, ...], ...]  # one tuple per point, as written (the recipe loader types them)


@dataclass(frozen=True)
class System:
    name: str
    mode: str
    stage2: str | None  # a train-continuous run (None: the recipe's sample.continuous)


@dataclass
class Point:
    system: System
    settings: dict[str, str]  # key -> value, the grid's part of this point
    folder: Path

    @property
    def label(self) -> str:
        return point_label(self.settings)


def parse_axis(text: str) -> Axis:
    """`KEY=V1,V2` or `K1:K2=A1:A2,B1:B2` -> Axis."""
    key_part, sep, value_part = text.partition("=")
    keys = tuple(k.strip().removeprefix("sample.") for k in key_part.split(":"))
    if not sep or not all(keys) or not value_part.strip():
        raise UserError(f"sweep grid {text!r}: expected KEY=V1,V2,... (e.g. stage2.num_iter=1,2,4) or tied keys "
                        "K1:K2=A1:A2,B1:B2")
    values = tuple(tuple(v.strip() for v in item.split(":")) for item in value_part.split(","))
    bad = [":".join(v) for v in values if len(v) != len(keys) or not all(v)]
    if bad:
        raise UserError(f"sweep grid {text!r}: each value must give {len(keys)} part(s) separated by ':' for "
                        f"{':'.join(keys)}; got {', '.join(repr(b) for b in bad)}")
    if len(set(values)) != len(values):
        raise UserError(f"sweep grid {text!r}: a value is repeated")
    return Axis(keys, values)


def parse_system(text: str) -> System:
    """`NAME=MODE[:STAGE2_RUN]` -> System."""
    from d2ctool.sampling.config import MODES

    name, sep, rest = text.partition("=")
    mode, _, stage2 = rest.partition(":")
    if not sep or not SYSTEM_NAME.fullmatch(name) or mode not in MODES:
        raise UserError(f"--system {text!r}: expected NAME=MODE[:STAGE2_RUN] with a NAME of letters, digits, '.', "
                        f"'_' or '-' and a MODE of {', '.join(MODES)} (e.g. two-stage-add=two-stage:runs/tiny/"
                        "continuous-add)")
    return System(name, mode, stage2 or None)


def point_label(settings: dict[str, str]) -> str:
    """The folder name (and plot label) of a point: its grid settings, or `default` without any."""
    return ",".join(f"{k}={v}" for k, v in settings.items()) or "default"


def axes_for(mode: str, axes: list[Axis]) -> list[Axis]:
    """The axes a mode's chain reads: stage-1 (stage-2) settings only where the mode runs stage 1 (2)."""
    from d2ctool.sampling.config import MODES

    def used(key: str) -> bool:
        stage = key.split(".", 1)[0]
        return stage not in ("stage1", "stage2") or getattr(MODES[mode], stage)

    return [a for a in axes if all(used(k) for k in a.keys)]


def plan_points(out: Path, systems: list[System], axes: list[Axis]) -> list[Point]:
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise UserError(f"--system: names must differ, got {', '.join(names)}")
    keys = [k for a in axes for k in a.keys]
    if len(set(keys)) != len(keys):
        raise UserError(f"sweep grid: a setting appears in two axes ({', '.join(sorted({k for k in keys if keys.count(k) > 1}))})")
    points = []
    for system in systems:
        mine = axes_for(system.mode, axes)
        for combo in itertools.product(*(a.values for a in mine)):
            settings = {k: v for a, vs in zip(mine, combo) for k, v in zip(a.keys, vs)}
            points.append(Point(system, settings, out / system.name / point_label(settings)))
    return points


def point_overrides(point: Point) -> list[str]:
    extra = [f"sample.mode={point.system.mode}"]
    if point.system.stage2:
        extra.append(f"sample.continuous={point.system.stage2}")
    return extra + [f"sample.{k}={v}" for k, v in point.settings.items()]


def run_sweep(out: str | Path, recipe_path: str | Path | None, overrides: list[str], systems: list[str],
              grid: list[str], ref: str | Path) -> list[dict]:
    """Sample, score and time every point not yet done, then write OUT/frontier.{json,md,png}; the frontier's
    rows are returned."""
    from d2ctool import distributed
    from d2ctool.evaluation.fid import run_fid
    from d2ctool.evaluation.frontier import point_row, write_frontier
    from d2ctool.recipe import load_recipe, recipe_yaml
    from d2ctool.sampling.chain import build_chain
    from d2ctool.sampling.run import sample
    from d2ctool.sampling.timing import time_chain

    out, ref = Path(out), Path(ref)
    if not systems:
        raise UserError("give at least one --system NAME=MODE[:STAGE2_RUN]")
    if not ref.exists():
        raise UserError(f"--ref {ref} not found: give the FID reference (`d2c fid-ref` output or an ADM .npz)")
    base = load_recipe(recipe_path, overrides, "sample")
    axes = [parse_axis(t) for t in (grid or base.sweep.grid)]
    points = plan_points(out, [parse_system(s) for s in systems], axes)
    # every point's settings are read (types, bounds, keys) before any work
    recipes = [load_recipe(recipe_path, list(overrides) + point_overrides(p), "sample") for p in points]
    for point, recipe in zip(points, recipes):
        try:
            recipe.sample.stage2.validate()
        except UserError as e:
            raise UserError(f"sweep point {point.system.name} {point.label}: sample.stage2.{e}") from None
    if distributed.rank_and_world()[1] > 1:
        raise UserError("d2c sweep times its points in one process: run it without torchrun")
    timing_file = "timing.json"
    for i, (point, recipe) in enumerate(zip(points, recipes)):
        done = [(point.folder / f).is_file() for f in ("manifest.json", "metrics.json", timing_file)]
        if all(done):
            continue
        info(f"sweep: point {i + 1}/{len(points)}: {point.system.name} {point.label}")
        point.folder.parent.mkdir(parents=True, exist_ok=True)
        sample(recipe.sample, recipe.tokenizers, point.folder, recipe_yaml(recipe))
        if not done[1]:
            run_fid(point.folder / "samples.npz", ref, recipe.fid, point.folder / "metrics.json")
        if not done[2]:
            chain = build_chain(recipe.sample, recipe.tokenizers, distributed.init(recipe.sample.device)[2])
            write_json(point.folder / timing_file, time_chain(chain, base.sweep.warmup_batches,
                                                              base.sweep.timing_batches))
    rows = [point_row(p.system.name, p.settings, p.folder, r.sample.seed) for p, r in zip(points, recipes)]
    write_frontier(out, rows, f"Frontier ({recipe_path or 'defaults'})")
    return rows
