"""The page under load (slow: `make test-slow`): 20 clients on loopback at once, each one generation at 2 steps —
none lost, every one told its queue position while it waited (the page serves one at a time)."""

import sys
from pathlib import Path

import pytest

from hyperbooth.cli.ui import load_studio
from hyperbooth.ui import build_app, serve_locally

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from ui_load import run_load  # noqa: E402


@pytest.mark.slow
def test_twenty_clients_at_once_are_all_answered(tiny_world_model, world_hypernet, tmp_path):
    from hyperbooth.world.splits import identity_seeds

    studio = load_studio(tiny_world_model, [world_hypernet], tmp_path)
    identities = list(identity_seeds("test", 4))
    app = build_app(studio, identities)
    url = serve_locally(app, studio)
    try:
        results = run_load(url, 20, 2, next(iter(studio.personalizers)), identities)
    finally:
        app.close()
    assert all(r["ok"] for r in results), [r.get("error") for r in results if not r["ok"]]
    assert sum(r["told_position"] for r in results) >= 15  # the first ones may start before a status poll sees them wait
    assert max(r["max_rank"] for r in results) >= 10  # one at a time: most waited behind others
