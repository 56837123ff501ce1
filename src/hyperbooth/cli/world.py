"""`hyperbooth world sample | train-oracles | train-encoder | eval-oracles | eval-base | eval-personalization |
merge-evals`: parse the arguments and call the library (:mod:`hyperbooth.world`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from hyperbooth.backbones.world import WorldBackbone
from hyperbooth.encoders import SHIPPED_WORLD_ENCODER
from hyperbooth.errors import ConfigError
from hyperbooth.files import atomic_write
from hyperbooth.grids import grid, save_png
from hyperbooth.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_PERS_INTERVAL, DEFAULT_W_BASE, DEFAULT_W_PERS, parse_interval
from hyperbooth.methods import SHIPPED_E2E
from hyperbooth.methods.dreambooth_lora import WORLD_CEILING, DreamBoothLoRA
from hyperbooth.personalize import parse_options
from hyperbooth.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS
from hyperbooth.world.contexts import Context
from hyperbooth.world.eval_base import evaluate_base_model
from hyperbooth.world.merge import hypernet_source, merge_results, select_hypernets
from hyperbooth.world.comparison import DEFAULT_TOLERANCE
from hyperbooth.world.oracles import SHIPPED_ORACLES, add_attribute_classifier, OracleTrainConfig, Oracles, evaluate_oracles, train_oracles
from hyperbooth.world.personalization import evaluate_personalization, load_personalizers, multi_reference_variants
from hyperbooth.world.pretrain import EncoderPretrainConfig, pretrain_world_encoder, save_world_encoder
from hyperbooth.world.protocol import ROW_KINDS, SWEEP_GUIDANCE_SCALES, SWEEP_W_BASE, SWEEP_W_PERS, check_weight, hm_cfg_pairs, personalization_rows
from hyperbooth.world.render import check_resolution, render
from hyperbooth.world.report import comparison_table, personalization_table, plot_fidelity, to_json
from hyperbooth.world.splits import identity_seeds


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("world", help="the embedded DreamBench-World: renders, oracles, base-model figures")
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION", required=True)

    sample = sub.add_parser("sample", help="write a grid of identities x contexts")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--split", default="test")
    sample.add_argument("--identities", type=_int, default=6)
    sample.add_argument("--contexts", default="plain,snow,beach,jungle,wooden_floor,pink_fabric,city,water,mountain,blue_house,purple_rug,wheat_field,cobblestone,red,purple,red_hat")
    sample.add_argument("--resolution", type=_int, default=32)
    sample.add_argument("--seed", type=_int, default=0, help="first identity seed to consider")
    sample.add_argument("--upscale", type=_int, default=4)
    sample.set_defaults(func=_sample)

    train = sub.add_parser("train-oracles", help="train the identity encoder, context and attribute classifiers (evaluation only)")
    train.add_argument("--out", type=Path, default=None, help="folder (default: the package's shipped oracles)")
    train.add_argument("--steps", type=_int, default=None, help="training steps of each oracle (default 2000)")
    train.add_argument("--attributes-only", action="store_true",
                       help="train only the attribute classifier and add it to the oracle folder --out (its other oracles stay)")
    train.set_defaults(func=_train_oracles)

    enc = sub.add_parser("train-encoder", help="pre-train the frozen world image encoder the hypernetworks read")
    enc.add_argument("--out", type=Path, default=None, help="folder (default: the package's shipped encoder)")
    enc.add_argument("--steps", type=_int, default=None)
    enc.set_defaults(func=_train_encoder)

    ev = sub.add_parser("eval-oracles", help="print the oracles' held-out figures")
    ev.add_argument("--oracles", type=Path, default=None)
    ev.add_argument("--num", type=_int, default=500)
    ev.set_defaults(func=_eval_oracles)

    base = sub.add_parser("eval-base", help="generate from held-out prompts and print the base model's figures")
    base.add_argument("--model", type=Path, default=None, help="base model folder (default: the shipped one)")
    base.add_argument("--oracles", type=Path, default=None)
    base.add_argument("--num", type=_int, default=320)
    base.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    base.add_argument("--steps", type=_int, default=DEFAULT_STEPS)
    base.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    base.add_argument("--json", type=Path, default=None, help="also write the figures here")
    base.add_argument("--grid", type=Path, default=None, help="also write a grid of generations here")
    base.set_defaults(func=_eval_base)

    pers = sub.add_parser(
        "eval-personalization",
        help="subject (retrieval top-1 of 8) vs prompt fidelity of personalizers of any method (floor, CFG, HM-CFG; --sweep for the HM-CFG grid)",
        description="Held-out identities x evaluation contexts; one row per method and setting; prints a Markdown table "
        "(identity retrieval top-1 among 8 first, AUC, attribute recovery, raw cosine, prompt fidelity) and the HM-CFG vs "
        "personalized-CFG comparison at equal retrieval top-1.",
    )
    pers.add_argument("--model", type=Path, default=None, help="base model folder (default: the shipped one)")
    pers.add_argument("--oracles", type=Path, default=None, help="oracle folder (default: the shipped one)")
    pers.add_argument("--hypernet", type=Path, action="append", default=None, help="personalizer folder of any registered method; repeat to compare several (default: the shipped e2e one)")
    pers.add_argument("--label", action="append", default=None, help="row label of each --hypernet, in order")
    pers.add_argument("--with", dest="options", action="append", default=None, metavar="KEY=VALUE,...",
                      help="inference options of each --hypernet, in order (e.g. iterations=2,fast_finetune_steps=40; '' for none)")
    pers.add_argument("--refs", default="1", help="reference images per subject, a list (e.g. 1,3)")
    pers.add_argument("--dreambooth-steps", default=None, help="also rows for DreamBooth-LoRA fine-tuned per identity for these step counts, a list (e.g. 400): the ceiling")
    pers.add_argument("--dreambooth-cache", type=Path, default=None, help="folder keeping the fine-tuned LoRAs (and their seconds) for reruns")
    pers.add_argument("--dreambooth-lr", type=float, default=WORLD_CEILING.lr, help=f"DreamBooth-LoRA learning rate (default {WORLD_CEILING.lr:g}: tuned on validation identities, see BENCHMARKS.md)")
    pers.add_argument("--dreambooth-rank", type=_int, default=WORLD_CEILING.rank, help=f"DreamBooth-LoRA rank (default {WORLD_CEILING.rank})")
    pers.add_argument("--multi-reference", default=None, help="ways to combine several references to compare, a list of tokens,mean_delta (default: each hypernetwork's own)")
    pers.add_argument("--num-identities", type=_int, default=50)
    pers.add_argument("--prompts", type=_int, default=6, help="evaluation prompts per identity")
    pers.add_argument("--steps", type=_int, default=DEFAULT_STEPS)
    pers.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    pers.add_argument("--guidance-scales", default=None, help=f"CFG scales of the floor and personalized-CFG rows (default {DEFAULT_GUIDANCE_SCALE:g}; with --sweep {_listed(SWEEP_GUIDANCE_SCALES)})")
    pers.add_argument("--w-base", default=None, help=f"HM-CFG w_base values (default {DEFAULT_W_BASE:g}; with --sweep {_listed(SWEEP_W_BASE)})")
    pers.add_argument("--w-pers", default=None, help=f"HM-CFG w_pers values (default {DEFAULT_W_PERS:g}; with --sweep {_listed(SWEEP_W_PERS)})")
    pers.add_argument("--sweep", action="store_true", help="every (w_base, w_pers) pair instead of pairing the lists element by element")
    pers.add_argument("--pers-interval", action="append", default=None, metavar="LO,HI",
                      help="HM-CFG timestep schedule: the personalized branch runs for noise levels t/T in [LO, HI]; repeat for several rows (default 0,1: every step)")
    pers.add_argument("--kinds", default="floor,described,cfg,hm-cfg",
                      help="which rows to generate, a list of floor,described,cfg,hm-cfg (described: the base model told each subject "
                           "in words; e.g. hm-cfg alone, to add HM-CFG settings to an earlier run with merge-evals)")
    pers.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="retrieval top-1 window of the HM-CFG vs CFG comparison")
    pers.add_argument("--batch-size", type=_int, default=48, help="prompts per generate call")
    pers.add_argument("--seed", type=_int, default=0)
    pers.add_argument("--json", type=Path, default=None, help="also write rows and comparison here")
    pers.add_argument("--plot", type=Path, default=None, help="also draw retrieval top-1 (x) vs prompt fidelity (y) here (PNG)")
    pers.set_defaults(func=_eval_personalization)

    merge = sub.add_parser(
        "merge-evals",
        help="one table (and plot) from several eval-personalization --json files of the same protocol",
        description="Rows of several eval-personalization runs (their --json files) as one table with the HM-CFG vs "
        "CFG comparison recomputed, e.g. a sweep run in parts. The runs must share identities, prompts, steps, "
        "scheduler, seed, batch size, base model and oracles, and a hypernetwork label must name one model; a row "
        "label in two files must have the same figures.",
    )
    merge.add_argument("results", nargs="+", metavar="FILE[:LABELS]",
                       help="eval-personalization --json files; FILE:a,b takes only hypernetwork labels a and b from that file")
    merge.add_argument("--keep", default=None, help="keep only these hypernetwork labels' rows (with the floor and the references), a list")
    merge.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="retrieval top-1 window of the HM-CFG vs CFG comparison")
    merge.add_argument("--json", type=Path, default=None, help="also write the merged rows and comparison here")
    merge.add_argument("--plot", type=Path, default=None, help="also draw retrieval top-1 (x) vs prompt fidelity (y) here (PNG)")
    merge.set_defaults(func=_merge_evals)


def _sample(args: argparse.Namespace) -> int:
    check_resolution(args.resolution)
    if args.identities < 1 or args.upscale < 1:
        raise ConfigError("--identities and --upscale must be at least 1")
    contexts = [Context.parse(name.strip()) for name in args.contexts.split(",") if name.strip()]
    seeds = list(identity_seeds(args.split, args.identities, start=args.seed))
    images = [[render(s, context=c, resolution=args.resolution) for c in contexts] for s in seeds]
    save_png(grid(images, args.upscale), args.out)
    print(f"wrote {args.out}: {len(seeds)} identities x {len(contexts)} contexts")
    return 0


def _train_oracles(args: argparse.Namespace) -> int:
    if args.attributes_only:
        cfg = OracleTrainConfig() if args.steps is None else OracleTrainConfig(attribute_steps=args.steps)
        figures = add_attribute_classifier(args.out or SHIPPED_ORACLES, cfg)
        print(json.dumps(figures, indent=2))
        return 0
    cfg = OracleTrainConfig() if args.steps is None else OracleTrainConfig(steps=args.steps, attribute_steps=args.steps)
    figures = train_oracles(args.out or SHIPPED_ORACLES, cfg)
    print(json.dumps(figures, indent=2))
    return 0


def _train_encoder(args: argparse.Namespace) -> int:
    cfg = EncoderPretrainConfig() if args.steps is None else EncoderPretrainConfig(steps=args.steps)
    if cfg.steps < 1:
        raise ConfigError(f"--steps={cfg.steps} must be at least 1")
    encoder, figures = pretrain_world_encoder(cfg)
    save_world_encoder(args.out or Path(SHIPPED_WORLD_ENCODER), encoder, cfg, figures)
    print(json.dumps(figures, indent=2))
    return 0


def _eval_oracles(args: argparse.Namespace) -> int:
    oracles = Oracles.load(args.oracles)
    print(json.dumps(evaluate_oracles(oracles.identity, oracles.context, n=args.num, attributes=oracles.attributes), indent=2))
    return 0


def _eval_base(args: argparse.Namespace) -> int:
    model = WorldBackbone.from_pretrained(args.model)
    oracles = Oracles.load(args.oracles)
    figures = evaluate_base_model(model, oracles, num=args.num, guidance_scale=args.guidance_scale, steps=args.steps, scheduler=args.scheduler, grid_path=args.grid)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


def _numbers(text: str, option: str, kind=float) -> list:
    """``"1,2,3"`` → numbers; a clear error naming the option and the bad item."""
    values = []
    for item in str(text).split(","):
        try:
            values.append(kind(item.strip()))
        except ValueError:
            raise ConfigError(f"{option}={text!r}: {item.strip()!r} is not {'an integer' if kind is int else 'a number'}") from None
    return values


def _merge_evals(args: argparse.Namespace) -> int:
    _check_outputs(args)
    results = []
    for item in args.results:
        path, only = Path(item), None
        if not path.exists() and ":" in item:  # FILE:LABELS; labels may hold colons (e2e:tokens), so may file names
            cuts = [i for i, ch in enumerate(item) if ch == ":"]
            cut = next((i for i in cuts if Path(item[:i]).is_file()), cuts[0])
            path, only = Path(item[:cut]), [k.strip() for k in item[cut + 1 :].split(",") if k.strip()]
            if not only:
                raise ConfigError(f"{item!r}: no hypernetwork labels after the colon (FILE:LABELS takes a list, e.g. {path}:e2e)")
        try:
            result = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"{str(path)!r} cannot be read ({e.strerror or type(e).__name__})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{str(path)!r} is not a JSON file ({type(e).__name__})") from None
        results.append((str(path), result if only is None else select_hypernets(result, only, str(path))))
    keep = [k.strip() for k in args.keep.split(",") if k.strip()] if args.keep else None
    return _report(merge_results(results, args.tolerance, keep=keep), args)


def _listed(values) -> str:
    """Numbers as an option's text: ``(2.0, 3.0)`` → ``"2,3"``."""
    return ",".join(f"{v:g}" for v in values)


def _eval_personalization(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    refs = _numbers(args.refs, "--refs", int)
    if any(k < 1 for k in refs):
        raise ConfigError(f"--refs={args.refs!r}: every reference count must be at least 1")
    scales = [check_weight(g, "--guidance-scales") for g in _numbers(args.guidance_scales or _listed(SWEEP_GUIDANCE_SCALES if args.sweep else [DEFAULT_GUIDANCE_SCALE]), "--guidance-scales")]
    w_base = _numbers(args.w_base or _listed(SWEEP_W_BASE if args.sweep else [DEFAULT_W_BASE]), "--w-base")
    w_pers = _numbers(args.w_pers or _listed(SWEEP_W_PERS if args.sweep else [DEFAULT_W_PERS]), "--w-pers")
    pairs = hm_cfg_pairs(w_base, w_pers, sweep=args.sweep)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in ROW_KINDS for k in kinds):
        raise ConfigError(f"--kinds={args.kinds!r} must name some of {', '.join(ROW_KINDS)}")
    intervals = [parse_interval(text) for text in args.pers_interval] if args.pers_interval else [DEFAULT_PERS_INTERVAL]
    for option, value in (("--num-identities", args.num_identities), ("--prompts", args.prompts), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{option}={value} must be at least 1")
    dreambooth_steps = _numbers(args.dreambooth_steps, "--dreambooth-steps", int) if args.dreambooth_steps else []
    if any(n < 1 for n in dreambooth_steps):
        raise ConfigError(f"--dreambooth-steps={args.dreambooth_steps!r}: every step count must be at least 1")
    _check_outputs(args)
    options = [parse_options(text) for text in args.options] if args.options is not None else None  # checked before anything loads
    if options is not None and len(options) != len(args.hypernet or [SHIPPED_E2E]):
        raise ConfigError(f"{len(options)} --with for {len(args.hypernet or [SHIPPED_E2E])} --hypernet folders; give one per folder ('' for none)")
    base = WorldBackbone.from_pretrained(args.model)
    folders = args.hypernet or [SHIPPED_E2E]
    personalizers = load_personalizers(folders, args.label, base)  # any registered method; checked against the UNet
    # what each row label stands for (folder and weights digest), so that merge-evals can refuse one label naming two
    # models, a retrained checkpoint in the same folder included
    sources = {label: hypernet_source(folder) for label, folder in zip(personalizers, folders)}
    if options is not None:
        for (label, personalizer), text, chosen in zip(personalizers.items(), args.options, options):
            personalizer.with_options(**chosen)
            if chosen:
                sources[label] += f" ({text})"
    if args.multi_reference:
        modes = [m.strip() for m in args.multi_reference.split(",") if m.strip()]
        personalizers = multi_reference_variants(personalizers, modes)
        sources = {f"{label}:{mode}": f"{folder} (multi_reference={mode})" for label, folder in sources.items() for mode in modes}
    for n in dreambooth_steps:  # the ceiling: DreamBooth-LoRA fine-tuned per identity, its LoRAs cached for reruns
        config = dataclasses.replace(WORLD_CEILING, steps=n, lr=args.dreambooth_lr, rank=args.dreambooth_rank, seed=args.seed)
        personalizers[f"dreambooth-lora-{n}"] = DreamBoothLoRA(config, cache=args.dreambooth_cache)
        sources[f"dreambooth-lora-{n}"] = f"DreamBooth-LoRA fine-tune, {n} steps, rank {config.rank}, lr {config.lr:g}, seed {args.seed}"
    oracles = Oracles.load(args.oracles)
    rows = [r for r in personalization_rows(list(personalizers), refs, scales, pairs, intervals, described=True) if r.kind in kinds]
    result = evaluate_personalization(
        base, oracles, personalizers, rows, num_identities=args.num_identities, prompts_per_identity=args.prompts,
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, scheduler=args.scheduler, tolerance=args.tolerance,
    )
    minutes = (time.perf_counter() - t0) / 60
    settings = result["settings"]
    settings["hypernet_folders"] = sources
    settings["oracles"] = str(Path(args.oracles).resolve()) if args.oracles else "shipped"
    result["elapsed_minutes"] = minutes
    footer = (f"{len(rows)} rows x {settings['images_per_row']} images ({settings['num_identities']} held-out identities x "
              f"{settings['prompts_per_identity']} prompts), {args.steps} {args.scheduler} steps: {minutes:.1f} min")
    return _report(result, args, footer)


def _report(result: dict, args: argparse.Namespace, footer: str | None = None) -> int:
    """Print the table and the HM-CFG comparison; write ``--json`` and ``--plot`` when asked."""
    print(personalization_table(result))
    print()
    print(comparison_table(result["comparison"], args.tolerance))
    if footer:
        print()
        print(footer)
    if args.json:
        text = json.dumps(to_json(result), indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    if args.plot:
        plot_fidelity(result["rows"], args.plot)
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    for option, out in (("--json", args.json), ("--plot", args.plot)):
        if out is not None and not out.parent.is_dir():
            raise ConfigError(f"{option} {str(out)!r}: folder {str(out.parent)!r} does not exist")
