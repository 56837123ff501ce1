"""`hyperbooth ui`: the web page (gradio) over the shipped world models or any backbone and hypernetwork folders.

    hyperbooth ui                                   # the world's base model, the shipped hypernetworks
    hyperbooth ui --model models/sd15 --hypernet runs/e2e_sd15/hypernet --port 7861
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from hyperbooth.backbones import load_backbone
from hyperbooth.errors import ConfigError
from hyperbooth.personalize import SHIPPED, load_personalizer


def register(subparsers) -> None:
    parser = subparsers.add_parser("ui", help="the web page: photos → LoRA → images, interpolation, downloads")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default=None, help="backbone folder or hub id (default: the shipped world model)")
    parser.add_argument("--hypernet", type=Path, action="append", default=None,
                        help="personalizer folder of any registered method; repeat for several (default: every shipped one)")
    parser.add_argument("--identities", type=int, default=16, help="held-out world identities offered on the page (world only)")
    parser.add_argument("--out", type=Path, default=None, help="where the page writes LoRA files and images (default: a temporary folder)")
    parser.add_argument("--allow-load", type=Path, action="append", default=None, metavar="ROOT",
                        help="let visitors load hypernetwork folders under ROOT from the page (off by default; repeatable)")
    parser.set_defaults(func=run)


def load_studio(model=None, hypernets=None, out=None):
    """The :class:`~hyperbooth.ui.Studio` the command serves (every folder checked before the page starts)."""
    from hyperbooth.ui import Studio

    backbone = load_backbone(model)
    folders = list(hypernets) if hypernets else [folder for folder in SHIPPED.values() if (folder / "hypernet_config.json").is_file()]
    personalizers = {}
    for folder in folders:
        personalizer = load_personalizer(folder)
        personalizer.check_backbone(backbone, source=folder)
        label = f"{personalizer.method} ({Path(folder).name})"
        personalizers[label if label not in personalizers else f"{label} #{len(personalizers)}"] = (personalizer.eval(), Path(folder))
    return Studio(backbone, personalizers, out_dir=out)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} must be in 1-65535")
    with socket.socket() as s:  # a busy port is named before the models load
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {args.host}:{args.port} ({e.strerror}); choose another --port") from None
    from hyperbooth.ui import build_app, launch_options
    from hyperbooth.world.splits import identity_seeds

    studio = load_studio(args.model, args.hypernet, args.out)
    studio.load_roots = [Path(root).expanduser().resolve() for root in (args.allow_load or [])]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who reaches it can use this machine's CPU/GPU (no login)"
              + ("; --allow-load lets them load folders under " + ", ".join(map(str, studio.load_roots)) if studio.load_roots else ""))
    identities = list(identity_seeds("test", args.identities)) if studio.is_world else []
    app = build_app(studio, identities)
    print(f"serving on http://{args.host}:{args.port} — {', '.join(studio.personalizers)}")
    app.launch(server_name=args.host, server_port=args.port, share=False, **launch_options(studio))
    return 0
