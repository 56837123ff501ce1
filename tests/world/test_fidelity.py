"""Identity retrieval and the pairwise AUC: paired across identities, so an image that looks a little like every
identity scores chance, however high its raw cosine."""

import pytest
import torch
from torch import nn

from hyperbooth.world.fidelity import DISTRACTOR_POOL, RETRIEVAL_CANDIDATES, attribute_recovery, distractors, identity_retrieval
from hyperbooth.world.identity import identity_class
from hyperbooth.world.oracles import ContextClassifier, Oracles
from hyperbooth.world.splits import identity_seeds, split_of


class _Carrier(nn.Module):
    """An "identity encoder" that reads the embedding written into the image's first pixels."""

    def forward(self, x):
        return nn.functional.normalize(x.flatten(1)[:, :16], dim=-1)


def _oracles_with_prototypes(seeds, generator):
    oracles = Oracles(_Carrier(), ContextClassifier())
    for s in {c for seed in seeds for c in (seed, *distractors(seed))}:
        oracles.prototypes[(s, 8, 1, None)] = nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    return oracles


def _images(vectors):
    x = torch.zeros(len(vectors), 3, 32, 32)
    x.view(len(vectors), -1)[:, :16] = torch.stack(vectors)
    return x


def test_distractors_are_other_held_out_identities_of_the_class():
    seed = next(identity_seeds("test", 1))
    picked = distractors(seed)
    assert len(picked) == RETRIEVAL_CANDIDATES - 1 == len(set(picked)) and seed not in picked
    assert all(split_of(s) == "test" and identity_class(s) == identity_class(seed) for s in picked)
    assert picked == distractors(seed)  # deterministic: every method is ranked against the same candidates
    assert len({tuple(distractors(s)) for s in identity_seeds("test", 6)}) > 1
    assert DISTRACTOR_POOL > RETRIEVAL_CANDIDATES
    from hyperbooth.world.identity import make_identity

    same = distractors(seed, same_color=True)
    assert len(set(same)) == RETRIEVAL_CANDIDATES - 1 and seed not in same
    assert {make_identity(s).primary for s in same} == {make_identity(seed).primary}  # colour alone cannot decide
    assert all(split_of(s) == "test" and identity_class(s) == identity_class(seed) for s in same)


def test_retrieval_and_auc_on_hand_made_embeddings():
    g = torch.Generator().manual_seed(0)
    seeds = list(identity_seeds("test", 3))
    oracles = _oracles_with_prototypes(seeds, g)
    own = [oracles.prototypes[(s, 8, 1, None)] for s in seeds]
    everyone = [torch.stack([oracles.prototypes[(c, 8, 1, None)] for c in (s, *distractors(s))]).mean(0) for s in seeds]
    out = identity_retrieval(oracles, _images(own + [-v for v in own] + everyone), seeds * 3)
    assert out["top1"][:3].tolist() == [1, 1, 1] and out["auc"][:3].tolist() == [1, 1, 1] and out["rank"][:3].tolist() == [1, 1, 1]
    assert out["top1"][3:6].tolist() == [0, 0, 0] and out["rank"][3:6].tolist() == [8, 8, 8] and out["auc"][3:6].tolist() == [0, 0, 0]
    # the mean of all 8 candidates: a positive raw cosine to its own identity, but ranked among the others
    cos = torch.stack([(nn.functional.normalize(m, dim=0) * o).sum() for m, o in zip(everyone, own)])
    assert (cos > 0.2).all() and out["top1"][6:].sum() < 3 and out["auc"][6:].mean() < 0.9
    with pytest.raises(ValueError, match="2 images but 3"):
        identity_retrieval(oracles, _images(own[:2]), seeds)


def test_shipped_oracles_retrieve_renders_and_read_their_attributes():
    from hyperbooth.world.fidelity import reference_images

    oracles = Oracles.load()
    seeds = list(identity_seeds("test", 8))
    refs = torch.cat([reference_images(s, 2) for s in seeds])
    out = identity_retrieval(oracles, refs, [s for s in seeds for _ in range(2)])
    assert out["top1"].mean() >= 0.8 and out["auc"].mean() >= 0.95
    shuffled = identity_retrieval(oracles, refs, [s for s in seeds[1:] + seeds[:1] for _ in range(2)])
    assert shuffled["top1"].mean() < 0.3  # another identity's renders are not retrieved as this one
    # a recolour prompt is judged against recoloured candidates: renders in that colour are still retrieved
    from hyperbooth.world.oracles import identity_views
    import numpy as np

    red = torch.cat([identity_views([s], 1, np.random.default_rng(s), recolor="red") for s in seeds])
    assert identity_retrieval(oracles, red, seeds, ["red"] * len(seeds))["top1"].mean() >= 0.6
    attrs = attribute_recovery(oracles, refs, [s for s in seeds for _ in range(2)], [None] * len(refs))
    if oracles.attributes is None:
        assert all(v.isnan().all() for v in attrs.values())
    else:
        assert attrs["primary"].nanmean() >= 0.8
