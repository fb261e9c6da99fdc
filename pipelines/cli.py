"""The ``chorus`` command line. Heavy modules are imported inside commands so --help is fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from pipelines.errors import OneLineParser

DEMO_DATA_DIR = ".chorus/demo-data"
VERBOSE_HELP = "show Ray's, Prefect's and the workers' logs live on stderr (default: a log file)"
DEFAULT_CONFIG = "chorus.yaml"  # read from the working directory when --config is not given


def _config_options(
    preset: str = "base", default_file: str | None = DEFAULT_CONFIG
) -> argparse.ArgumentParser:
    from pipelines.presets import PRESETS

    parent = OneLineParser(add_help=False)
    parent.set_defaults(default_config=default_file)
    group = parent.add_argument_group("configuration")
    group.add_argument(
        "--preset",
        default=preset,
        help=f"named preset to start from: {', '.join(sorted(PRESETS))} (default: {preset})",
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file over the preset"
        + (f" (default: ./{default_file} when it exists)" if default_file else ""),
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.epochs=5 (repeatable)",
    )
    group.add_argument("--store", help="artefact store: a folder or s3://bucket/prefix")
    parent.add_argument(
        "--force",
        action="store_true",
        help="redo the work even when the store holds an artefact made the same way",
    )
    parent.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return parent


def _load_config(args: argparse.Namespace):
    from pipelines.config import load

    overrides = list(args.overrides)
    if getattr(args, "objective", None):
        overrides.append(f"train.objective={args.objective}")
    if args.store:
        overrides.append(f"store={args.store}")
    path = args.config
    if path is None and args.default_config and Path(args.default_config).is_file():
        path = args.default_config
    return load(args.preset, path, overrides)


def _open_store(uri: str | None, *, create: bool = False):
    """The process's one :class:`~storage.artefacts.Store`, handed to the stage it runs.
    Commands that only read keep ``create=False``: a missing store is then a user error."""
    from storage.artefacts import Store

    return Store.open(uri, create=create)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    out = getattr(args, "result_stream", sys.stdout)
    print(json.dumps(payload, indent=2, default=str) if args.json else text, file=out, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines import console, demo_data, report
    from pipelines.config import check_objectives

    cfg = _load_config(args)
    check_objectives(cfg)
    folder = Path(DEMO_DATA_DIR, f"size{cfg.demo.size}-seed{cfg.demo.seed}")
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        console.note(f"generating {cfg.demo.size} demo records in {folder}")
        demo_data.generate(folder, size=cfg.demo.size, seed=cfg.demo.seed, progress=True)
    objectives = dict(cfg.demo.objectives)
    summary = _flows().end_to_end(str(manifest.resolve()), cfg, objectives, force=args.force)
    if not args.missing:
        _emit(args, summary["table"] if args.json else summary, report.render(summary))
        return 0
    target = cfg.evaluate.target or next(iter(cfg.data.columns))
    blank = tuple(name for name in cfg.data.columns if name != target)
    partial = demo_data.with_missing(manifest, args.missing, blank, seed=cfg.demo.seed)
    console.note(f"{', '.join(blank)} blank in {args.missing:.0%} of the training rows: {partial}")
    missing = _flows().end_to_end(str(partial.resolve()), cfg, objectives, force=args.force)
    compared = report.write_missing(cfg, summary, missing, args.missing, blank, force=args.force)
    tables = {"observed": summary["table"], "missing": missing["table"], "rate": args.missing}
    tables["report"] = compared["uri"]
    text = report.with_and_without(summary, missing, args.missing, blank)
    text += f"\n\nwith and without missing data: {compared['uri']}/report.md"
    _emit(args, tables, text)
    return 0


def _missing_rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        rate = float("nan")
    if not 0.0 <= rate < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1) is needed, got {value!r}")
    return rate


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines import report

    cfg = _load_config(args)
    objectives = {args.objective: {}} if args.objective else None
    summary = _flows().end_to_end(args.manifest, cfg, objectives, force=args.force)
    _emit(args, summary["table"] if args.json else summary, report.render(summary))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipelines import console, deploy

    if args.file:
        specs = deploy.from_file(args.file, list(args.overrides))
    elif args.manifest and args.name:
        schedule = {"cron": args.cron} if args.cron else {"interval": args.interval}
        cfg = _load_config(args)
        specs = [
            deploy.spec(
                args.name,
                args.manifest,
                cfg,
                flow=args.flow,
                incremental=args.incremental,
                **schedule,
            )
        ]
    else:
        raise deploy.DeploymentError("chorus deploy needs MANIFEST --name NAME, or --file FILE")
    server = deploy.require_server()
    names = ", ".join(s.qualified_name for s in specs)
    console.note(f"serving {names} on {server} (Ctrl-C stops)")
    from pipelines.flows import serve

    serve(specs, pause_on_shutdown=args.pause_on_shutdown)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipelines import demo_data

    manifest = demo_data.generate(args.dir, size=args.size, seed=args.seed, progress=True)
    _emit(args, {"manifest": str(manifest)}, f"wrote {args.size} records: {manifest}")
    return 0


def _on_prefect_server() -> bool:
    """Stage commands run their flow when a Prefect server is configured, so the run shows in
    its UI; without one they call the stage directly: the ephemeral API would add ~10 s to
    each command (~22 s on first use) for runs nobody sees (README, "Ad-hoc runs")."""
    return bool(os.environ.get("PREFECT_API_URL"))


def _flows():
    """:mod:`pipelines.flows`, imported once the embedded Prefect defaults are set."""
    from pipelines.runtime import configure_prefect_defaults

    configure_prefect_defaults()
    from pipelines import flows

    return flows


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    options = {"incremental": args.incremental, "base": args.base, "name": args.name}
    if _on_prefect_server():
        manifest = _flows().ingest_flow(args.manifest, cfg, force=args.force, **options)
    else:
        from pipelines.ingest import ingest

        store = _open_store(cfg.store, create=True)
        progress = not args.json
        manifest = ingest(
            args.manifest, cfg, progress=progress, store=store, force=args.force, **options
        )
    s = manifest["summary"]
    base = manifest.get("base")
    text = (
        f"dataset {manifest['id']}{' (reused)' if s['reused'] else ''}: {s['rows_in']} rows in, "
        f"{s['rows_written']} written, {s['quarantined']} quarantined "
        f"{manifest['quarantine']['by_kind']}, splits {manifest['splits']}"
        + (f", {s['records_per_s']} records/s" if "records_per_s" in s else "")
        + (
            f"; from {base}: {s['records_decoded']} decoded, {s['records_reused']} reused, "
            f"{s['records_removed']} removed"
            if base
            else ""
        )
    )
    payload = {"dataset": manifest["id"], "base": base, **s, "quarantine": manifest["quarantine"]}
    _emit(args, payload, text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.config import check_objectives

    cfg = _load_config(args)
    check_objectives(cfg)
    if _on_prefect_server():
        trained = _flows().train_flow(args.dataset, cfg, force=args.force)
        result = trained["runs"][cfg.train.objective]
    else:
        from pipelines.train.launch import train

        store = _open_store(cfg.store)
        result = train(args.dataset, cfg, args.objective, store=store, force=args.force)
    how = "reused" if result["reused"] else "trained"
    _emit(args, result, f"run {result['run']} ({how}): checkpoint {result['checkpoint']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines import report

    cfg = _load_config(args)
    if _on_prefect_server():
        result = _flows().evaluate_flow(args.checkpoint, args.dataset, cfg, force=args.force)
    else:
        from pipelines.train.evaluate import evaluate

        store = _open_store(cfg.store)
        result = evaluate(args.checkpoint, args.dataset, cfg, store=store, force=args.force)
    lines = [f"{result['evaluation']}: {report.headline(result)}"]
    reference = result["reference"]
    lines.append(
        f"reference for zero-shot and averaging: {reference['split']} "
        f"({reference['source']}, {reference['rows']} rows)"
        if reference
        else "reference: none (modality means of the evaluated split)"
    )
    if "zero_shot" in result:
        lines.append(f"zero-shot: {result['zero_shot']}")
    lines += report.sweep_lines({result["objective"]: result}) + [f"stored: {result['uri']}"]
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if _on_prefect_server():
        flows = _flows()
        result = flows.embed_flow(args.checkpoint, args.dataset, cfg, args.split, args.force)
    else:
        from pipelines.train.evaluate import export_embeddings

        result = export_embeddings(
            args.checkpoint,
            args.dataset,
            cfg,
            args.split,
            store=_open_store(cfg.store),
            force=args.force,
        )
    _emit(args, result, f"{result['embedding']}: {result['rows']} rows -> {result['uri']}")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    from pipelines.dataset import DatasetVersion

    dataset = DatasetVersion.open(_open_store(args.store), args.dataset)
    records = dataset.quarantine(args.kind).to_pylist()
    lines = [
        f"{r['id']}  {r['modality']}  {r['error_kind']}  {r['uri']}  {r['message']}"
        for r in records
    ]
    of_kind = f" of kind {args.kind}" if args.kind else ""
    _emit(args, records, "\n".join(lines) or f"no quarantined records{of_kind} in {dataset.id}")
    return 0


def cmd_artefacts(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    action = {"list": "ls"}.get(args.action, args.action)
    return _ARTEFACT_ACTIONS[action](args, store)


def _artefacts_ls(args: argparse.Namespace, store) -> int:
    entries = store.entries(args.kind, args.name)
    lines = [f"{e.created_at}  {e.kind:<10} {e.id:<40} {e.name:<20} {e.uri}" for e in entries]
    _emit(args, [e.to_json() for e in entries], "\n".join(lines) or f"no artefacts in {store.root}")
    return 0


def _artefacts_show(args: argparse.Namespace, store) -> int:
    record = store.resolve(args.reference)
    text = json.dumps(record.to_json(), indent=2)
    if record.kind == "dataset" and not args.json:
        from pipelines.dataset import DatasetVersion

        text = DatasetVersion.open(store, record.id).describe()
    _emit(args, record.to_json(), text)
    return 0


def _artefacts_get(args: argparse.Namespace, store) -> int:
    files = store.download(args.reference, args.second)
    _emit(args, [str(f) for f in files], f"downloaded {len(files)} files to {args.second}")
    return 0


def _artefacts_tag(args: argparse.Namespace, store) -> int:
    move = store.tag(args.reference, args.second)
    text = f"{move.name}@{move.alias} -> {move.id}" + (
        f" (was {move.previous})" if move.previous else ""
    )
    _emit(args, move.to_json(), text)
    return 0


def _artefacts_rm(args: argparse.Namespace, store) -> int:
    record = store.resolve(args.reference)
    store.remove(record, force=args.force)
    _emit(args, {"removed": record.id}, f"removed {record.kind} {record.id}")
    return 0


def _artefacts_gc(args: argparse.Namespace, store) -> int:
    from storage.publish import GRACE_S

    gone = store.collect_garbage(GRACE_S if args.grace is None else args.grace)
    text = "\n".join(f"removed {path}" for path in gone) or "nothing to collect"
    _emit(args, {"removed": gone}, text)
    return 0


_ARTEFACT_ACTIONS = {
    "ls": _artefacts_ls,
    "show": _artefacts_show,
    "get": _artefacts_get,
    "tag": _artefacts_tag,
    "rm": _artefacts_rm,
    "gc": _artefacts_gc,
}
# What each action takes after it (the parser's two optional positionals).
_ARTEFACT_OPERANDS = {
    "show": ("ID|NAME@ALIAS",),
    "get": ("ID|NAME@ALIAS", "DEST"),
    "tag": ("ID|NAME@ALIAS", "ALIAS"),
    "rm": ("ID|NAME@ALIAS",),
}


def cmd_lineage(args: argparse.Namespace) -> int:
    from storage import lineage_graph

    store = _open_store(args.store)
    closure = lineage_graph.load(store.root).closure(args.id, down=args.down, depth=args.depth)
    if args.format == "json":
        print(json.dumps(closure.to_json(), indent=2), file=args.result_stream, flush=True)
    else:
        text = closure.to_dot() if args.format == "dot" else closure.to_tree()
        print(text, file=args.result_stream, flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines import status

    cfg = _load_config(args)
    store = _open_store(cfg.store)
    found = status.stale(store, cfg, args.id)
    fresh = f"{args.id} and its inputs are" if args.id else f"every artefact in {store.root} is"
    text = "\n".join(s.line() for s in found) or f"{fresh} up to date"
    _emit(args, [s.to_json() for s in found], text)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from pipelines.experiments import xor

    return xor.main(args.rest)


def cmd_init(args: argparse.Namespace) -> int:
    from pipelines import init

    found = init.write(args.manifest, args.output, force=args.force)
    lines = [f"{c.name}: {c.settings['kind']}, {c.seen}" for c in found.columns]
    lines += [f"not used: {name}: {why}" for name, why in found.skipped.items()]
    lines.append(f"splits: {', '.join(f'{k} ({n})' for k, n in sorted(found.splits.items()))}")
    if found.label_classes is not None:
        lines.append(f"label: {found.label_classes} classes")
    lines.append(f"wrote {args.output}: edit it, then `chorus ingest {args.manifest}`")
    _emit(args, {"config": str(args.output), **found.to_json()}, "\n".join(lines))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.config import to_dict

    settings = to_dict(_load_config(args))
    _emit(args, settings, yaml.safe_dump(settings, sort_keys=False))
    return 0


def cmd_objectives(args: argparse.Namespace) -> int:
    from pipelines.train.objectives import names

    _emit(args, names(), "\n".join(names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(  # its subparsers are of its class: every error on one line
        prog="chorus",
        description="Paired images, audio, text and time series -> versioned Arrow datasets "
        "-> N-modality contrastive embeddings (Symile, CLIP, ...), with lineage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conf = _config_options()

    p = sub.add_parser(
        "demo",
        parents=[_config_options(preset="demo", default_file=None)],
        help="generate demo data and run end to end",
    )
    p.add_argument(
        "--missing",
        type=_missing_rate,
        default=0.0,
        metavar="RATE",
        help="also train with each non-target modality blank in this fraction of the training "
        "rows (e.g. 0.3) and compare with the fully observed runs on the same test rows",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", parents=[conf], help="ingest, train, evaluate and report a manifest")
    p.add_argument("manifest", help="CSV, JSONL or Parquet manifest (path or s3:// URI)")
    p.add_argument("--objective", help="objective name (default: train.objective)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "deploy",
        parents=[conf],
        help="serve scheduled deployments on the Prefect server at PREFECT_API_URL",
    )
    p.add_argument("manifest", nargs="?", help="input manifest of the deployment's runs")
    p.add_argument("--name", help="deployment name: served as chorus-<flow>/NAME")
    p.add_argument("--flow", default="end_to_end", choices=["end_to_end", "ingest", "train"])
    schedule = p.add_mutually_exclusive_group()
    schedule.add_argument("--cron", help="cron schedule, e.g. '0 2 * * *'")
    schedule.add_argument("--interval", type=float, help="seconds between runs")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="each run decodes only the records new or changed since the last version",
    )
    p.add_argument("--file", help="YAML file of several deployments (see pipelines/deploy.py)")
    p.add_argument(
        "--pause-on-shutdown", action="store_true", help="pause the schedules when stopped"
    )
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("demo-data", help="write the synthetic four-modality demo data set")
    p.add_argument("dir")
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("ingest", parents=[conf], help="manifest -> versioned Parquet dataset")
    p.add_argument(
        "manifest",
        help="CSV, JSONL or Parquet manifest (path or s3:// URI), or a glob of them in one "
        "folder (quote it: 'drops/*.csv')",
    )
    p.add_argument(
        "--incremental",
        action="store_true",
        help="keep the unchanged records of the base version; decode only new and changed ones",
    )
    p.add_argument(
        "--base",
        help="dataset id of the base version (default: the newest ingested from the same "
        "MANIFEST argument with the same data settings)",
    )
    p.add_argument(
        "--name",
        help="the dataset's name, for NAME@latest (default: the manifest's file stem, or a "
        "glob's folder name)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", parents=[conf], help="train on an ingested dataset")
    p.add_argument("dataset", help="dataset id (see `chorus artefacts list`)")
    p.add_argument("--objective", help="objective name (default: train.objective)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[conf], help="retrieval metrics of a checkpoint")
    checkpoint_help = (
        "run id (see `chorus artefacts list --kind run`), checkpoint folder or checkpoint URI"
    )
    dataset_help = "dataset id (default: the dataset the run trained on)"
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("dataset", nargs="?", help=dataset_help)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("embed", parents=[conf], help="export embeddings of a split as Parquet")
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("dataset", nargs="?", help=dataset_help)
    p.add_argument("--split", help="split to embed (default: evaluate.split)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("quarantine", help="list a dataset's quarantined records and why")
    p.add_argument("dataset", help="dataset id (see `chorus artefacts list --kind dataset`)")
    p.add_argument("--kind", help="only this error kind (e.g. missing_file, unsupported_format)")
    p.add_argument("--store", help="artefact store: a folder or s3://bucket/prefix")
    p.add_argument("--json", action="store_true", help="print the records as JSON on stdout")
    p.set_defaults(func=cmd_quarantine)

    p = sub.add_parser(
        "artefacts",
        help="list, show, download, tag or remove stored artefacts",
        usage="chorus artefacts {ls [--kind K] [--name N] | show REF | get REF DEST | "
        "tag REF ALIAS | rm REF [--force] | gc [--grace SECONDS]} [--store S] [--json]",
        description="REF: an artefact id, NAME@ALIAS, a NAME (its @latest) or the artefact's URI",
    )
    p.add_argument("action", choices=["ls", "list", "show", "get", "tag", "rm", "gc"])
    p.add_argument("reference", nargs="?", metavar="REF", help="the artefact (show, get, tag, rm)")
    p.add_argument(
        "second", nargs="?", metavar="DEST|ALIAS", help="local folder (get), alias (tag)"
    )
    p.add_argument(
        "--kind", help="only this kind: dataset, run, evaluation, embedding, report (ls)"
    )
    p.add_argument("--name", help="only artefacts of this name (ls)")
    p.add_argument("--force", action="store_true", help="remove even what others depend on (rm)")
    p.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="collect only what was untouched this long (gc; default 6 hours)",
    )
    p.add_argument("--store", help="artefact store: a folder or s3://bucket/prefix")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_artefacts)

    p = sub.add_parser("lineage", help="what an artefact was made from, or what came from it")
    p.add_argument("id", help="artefact id: ds-..., a run name, ev-..., em-... or rp-...")
    way = p.add_mutually_exclusive_group()
    way.add_argument("--up", action="store_false", dest="down", help="its inputs (default)")
    way.add_argument("--down", action="store_true", help="everything made from it")
    p.add_argument("--depth", type=int, metavar="N", help="at most N steps (default: all)")
    p.add_argument("--format", choices=["tree", "json", "dot"], default="tree")
    p.add_argument("--store", help="artefact store: a folder or s3://bucket/prefix")
    p.set_defaults(func=cmd_lineage, down=False, json=False)

    p = sub.add_parser(
        "status",
        parents=[conf],
        help="which artefacts are stale, and why (a newer input, changed code or config)",
    )
    p.add_argument("id", nargs="?", help="artefact id or NAME@ALIAS: only it and its inputs")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("experiment", help="synthetic experiments (xor)")
    p.add_argument("name", choices=["xor"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the experiment")
    p.set_defaults(func=cmd_experiment, json=False, plain_stdout=True)  # prints its own output

    p = sub.add_parser("init", help="write a starting config for a manifest (chorus.yaml)")
    p.add_argument("manifest", help="CSV, JSONL or Parquet manifest (path or s3:// URI)")
    p.add_argument("-o", "--output", default=DEFAULT_CONFIG, help="config file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing config file")
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", parents=[conf], help="print the resolved configuration")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("objectives", help="list the registered objectives")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_objectives)
    for command in sub.choices.values():  # -v also after the command; SUPPRESS keeps -v before
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def _one_line(exc: BaseException) -> str:
    """A user error on one line (validation messages may span several)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _run(args: argparse.Namespace, log_path: Path | None) -> int:
    """A user error prints one line and exits 2; anything else keeps its traceback, on the
    console and in the log (whose path is printed), and exits 1."""
    from pipelines import console
    from pipelines.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {_one_line(exc)}", file=console.stream())
        return 2
    except (Exception, KeyboardInterrupt) as exc:
        traceback.print_exc()  # into the log (the console itself with -v)
        if log_path is not None:
            if not isinstance(exc, KeyboardInterrupt):
                traceback.print_exc(file=console.stream())
            print(f"log: {log_path}", file=console.stream())
        return 130 if isinstance(exc, KeyboardInterrupt) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "artefacts":
        operands = _ARTEFACT_OPERANDS.get(args.action, ())
        if None in [args.reference, args.second][: len(operands)]:
            print(f"error: artefacts {args.action} needs {' '.join(operands)}", file=sys.stderr)
            return 2
    if getattr(args, "plain_stdout", False):
        return _run(args, None)
    from pipelines import console
    from pipelines.runtime import shutdown_ray

    live = False if getattr(args, "json", False) else None
    caller_has_ray = _has_ray_session()  # an in-process caller's session stays its own
    with console.session(args.command, verbose=args.verbose, live=live) as session:
        args.result_stream = session.result
        try:
            return _run(args, session.log_path)
        finally:
            if not caller_has_ray:
                shutdown_ray()  # late worker output goes to the log, not the terminal


def _has_ray_session() -> bool:
    """Whether this process has a Ray session already (never importing Ray to ask)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
